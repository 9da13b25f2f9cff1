"""An example spec with the structure of the paper's user study, and placeholder images.

The questions reproduce supplementary §3 of Giulivi & Boracchi (2024): objects, correct answers
and the published share of correct answers for the questions whose objects the supplementary
text shows (it lists 10 questions; in our copy one more answer, "A2 with 100%", has no legible
objects and is left out). The paper's images are not distributed, so the images written here
are **generated placeholders**: a flat scene with two labelled shapes and, as "explanations",
the scene dimmed with a heat blob over one shape. Replace them with your own image and GA maps.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write_bytes, atomic_write_text
from .conventions import UsageError, check_output_dir

__all__ = ["PAPER_QUESTIONS", "ExampleExistsError", "write_example"]

# (object 1, object 2, correct answer, published share correct) from supplementary §3.
PAPER_QUESTIONS: tuple[tuple[str, str, str, float], ...] = (
    ("cat", "TV/monitor", "A1", 1.00),
    ("person", "horse", "A2", 0.71),
    ("person", "boat", "A2", 1.00),
    ("person", "motorbike", "A1", 1.00),
    ("person", "horse", "A1", 1.00),
)

_SIZE = (320, 240)
# Where the two objects sit in every placeholder scene: (x0, y0, x1, y1).
_BOXES = ((30, 60, 140, 200), (180, 40, 295, 150))
_COLOURS = ((70, 130, 180), (205, 133, 63))


def _scene(objects: tuple[str, str]) -> Image.Image:
    im = Image.new("RGB", _SIZE, (228, 232, 220))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 170, _SIZE[0], _SIZE[1]), fill=(196, 206, 180))
    # Pillow's scalable font (never its tiny bitmap one); dark text reads on both shape colours
    name_font = ImageFont.load_default(size=18)
    note_font = ImageFont.load_default(size=13)
    for box, colour, name in zip(_BOXES, _COLOURS, objects, strict=True):
        draw.rounded_rectangle(box, radius=12, fill=colour, outline=(40, 40, 40), width=2)
        draw.text((box[0] + 8, box[1] + 6), name, fill=(20, 20, 20), font=name_font)
    draw.text((6, _SIZE[1] - 18), "placeholder image", fill=(50, 50, 50), font=note_font)
    return im


def _explanation(scene: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The scene dimmed, with a red-to-yellow blob over ``box`` (a stand-in for a GA map)."""
    w, h = _SIZE
    ys, xs = np.mgrid[0:h, 0:w]  # (H, W)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sx, sy = (box[2] - box[0]) / 2.2, (box[3] - box[1]) / 2.2
    heat = np.exp(-(((xs - cx) / sx) ** 2 + ((ys - cy) / sy) ** 2))  # (H, W) in [0, 1]
    colour = np.stack([np.full_like(heat, 255), 255 * heat, np.zeros_like(heat)], axis=-1)
    base = np.asarray(scene, dtype=np.float64) * 0.35  # (H, W, 3)
    alpha = (0.85 * heat)[..., None]
    out = base * (1 - alpha) + colour * alpha
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _png(im: Image.Image) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


class ExampleExistsError(UsageError):
    """The folder already holds a spec or images of its own; nothing was written."""


def _existing(out: Path) -> list[Path]:
    names = ["study.yaml"]
    for number in range(1, len(PAPER_QUESTIONS) + 1):
        names += [f"images/q{number}.png", f"images/q{number}_e1.png", f"images/q{number}_e2.png"]
    return [out / name for name in names if (out / name).exists()]


def write_example(out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``study.yaml`` and its placeholder images into ``out_dir``.

    Args:
        out_dir: Folder to write into (created if missing); images go to ``images/``.
        force: Replace an existing ``study.yaml`` and placeholder images. Without it, a folder
            that already holds any of them is left untouched (an edited spec is never lost).

    Returns:
        The path of the spec file.

    Raises:
        ExampleExistsError: without ``force``, the folder already holds one of the files.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> write_example(root).name
    'study.yaml'
    >>> try:
    ...     write_example(root)
    ... except ExampleExistsError as exc:
    ...     print(str(exc).replace(root, "DIR"))
    DIR/study.yaml already exists (and 15 more of the example's files); nothing was written (use --force to replace them)
    """
    out = Path(out_dir)
    existing = _existing(out)
    if existing and not force:
        more = (
            f" (and {len(existing) - 1} more of the example's files)" if len(existing) > 1 else ""
        )
        raise ExampleExistsError(
            f"{existing[0]} already exists{more}; nothing was written (use --force to replace them)"
        )
    check_output_dir(out, "example folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for number, (first, second, correct, rate) in enumerate(PAPER_QUESTIONS, start=1):
        scene = _scene((first, second))
        by_object = [_explanation(scene, box) for box in _BOXES]
        # A1: explanation 1 is for object 1; A2: explanation 1 is for object 2.
        shown = by_object if correct == "A1" else by_object[::-1]
        names = [f"images/q{number}.png", f"images/q{number}_e1.png", f"images/q{number}_e2.png"]
        for name, im in zip(names, [scene, *shown], strict=True):
            atomic_write_bytes(out / name, _png(im))
        entries.append(
            f"  - id: q{number}\n"
            f"    image: {names[0]}\n"
            f'    objects: ["{first}", "{second}"]\n'
            f"    explanations: [{names[1]}, {names[2]}]\n"
            f"    correct: {correct}\n"
            f"    reference_share_correct: {rate}\n"
        )
    spec = (
        "# Example user study with the structure of supplementary §3 of Giulivi & Boracchi (2024):\n"
        "# objects, correct answers and published rates (reference_share_correct) of the paper's\n"
        "# questions. The images are GENERATED PLACEHOLDERS: put your image and GA maps instead.\n"
        "title: Which explanation is for which object?\n"
        "seed: 2024\n"
        "questions:\n" + "".join(entries)
    )
    path = out / "study.yaml"
    atomic_write_text(path, spec)
    return path
