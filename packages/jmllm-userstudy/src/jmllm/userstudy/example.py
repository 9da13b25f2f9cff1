"""Example studies: one built from the toy world's GA explanations, and the paper's structure
with placeholder images.

``source="toy"`` (the default of ``jmllm-userstudy example``; needs the ``joint`` extra): five
held-out toy-world scenes (:mod:`jmllm.joint.toy.scenes`) with two objects of different shapes,
each object explained by the built-in toy J by its name (``"yellow triangle"``: the toy world
names an object by colour and shape; ``jmllm.joint.object_explanation``, drawn as the paper's box
view, untitled). The participant matches the two maps to the two objects; the correct
answers follow the paper's A1/A2 sequence. An example's key must be what its pictures show, so
only scenes where each object's GA map peaks on that object (and not on the other) are used; the
scenes passed over are counted in the spec's header. How often GA localises on the toy world is
measured by ``benchmarks/toy_validity.py``, not assumed here: a real study keeps every question.

``source="placeholders"``: the questions reproduce supplementary §3 of Giulivi & Boracchi (2024): objects, correct answers
and the published share of correct answers for the questions whose objects the supplementary
text shows (it lists 10 questions; in our copy one more answer, "A2 with 100%", has no legible
objects and is left out). The paper's images are not distributed, so the images written here
are **generated placeholders**: a flat scene with two labelled shapes and, as "explanations",
the scene dimmed with a heat blob over one shape. Replace them with your own image and GA maps.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write_bytes, atomic_write_text
from .conventions import UsageError, check_output_dir, claim_output_folder

EXAMPLE_COMMAND = "jmllm-userstudy example"

__all__ = [
    "EXAMPLE_SOURCES",
    "PAPER_QUESTIONS",
    "ExampleExistsError",
    "explanations_agree",
    "toy_questions",
    "write_example",
]

EXAMPLE_SOURCES = ("toy", "placeholders")

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


def toy_questions(count: int = 5, model: Any = None) -> list[tuple[int, str, str]]:
    """The held-out toy scenes of the toy example: ``(scene index, object 1, object 2)`` (their
    names, ``"yellow triangle"``) for the first ``count`` scenes with exactly two objects of
    different shapes (left to right) — with a ``model``, only those where its GA explanation of
    each object points at that object (:func:`explanations_agree`).

    Example:
        >>> toy_questions(2)  # doctest: +SKIP
        [(1, 'blue triangle', 'red square'), (4, 'green circle', 'red cross')]
    """
    return [(index, first, second) for index, first, second, _ in _toy_scenes(count, model)[0]]


def explanations_agree(results: Sequence[Any], boxes: Sequence[tuple[int, int, int, int]]) -> bool:
    """Whether explanation ``i`` points at object ``i`` and at no other: the peak of its class
    map (the pointing game) lies in box ``i`` (``x0, y0, x1, y1``, ends exclusive) and in no
    other box — what a participant reading the pictures right would answer.

    Example:
        >>> explanations_agree(results, [o.box for o in scene.objects])  # doctest: +SKIP
        True
    """
    from jmllm.joint.toy.localisation import peak_in_box

    for i, result in enumerate(results):
        saliency = result.map("class")
        hits = [j for j, box in enumerate(boxes) if peak_in_box(saliency, box)]
        if hits != [i]:
            return False
    return True


def _toy_scenes(
    count: int, model: Any = None
) -> tuple[list[tuple[int, str, str, list[Image.Image]]], int]:
    """``count`` toy questions ``(index, object 1, object 2, [picture 1, picture 2])`` (pictures
    only with a model) and how many two-shape scenes were passed over because a map pointed
    elsewhere."""
    from jmllm.joint import object_explanation, object_picture
    from jmllm.joint.saliency import GradientAlignment
    from jmllm.joint.toy.scenes import make_scene

    ga = GradientAlignment(model) if model is not None else None
    found: list[tuple[int, str, str, list[Image.Image]]] = []
    passed_over = 0
    index = 0
    bar = None
    if model is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc="GA explanations", unit="question", leave=False)
    while len(found) < count:
        scene = make_scene("heldout", index)
        index += 1
        shapes = [o.shape for o in scene.objects]
        if len(shapes) != 2 or shapes[0] == shapes[1]:
            continue
        names = [o.name for o in scene.objects]
        pictures: list[Image.Image] = []
        if model is not None:
            emb = model.embed([scene.image])
            explained = [object_explanation(emb, name, model=model, ga=ga) for name in names]
            if not explanations_agree([r for r, _ in explained], [o.box for o in scene.objects]):
                passed_over += 1
                continue
            pictures = [object_picture(r, p) for r, p in explained]
        found.append((scene.index, names[0], names[1], pictures))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return found, passed_over


def _toy_entries(
    out: Path, *, device: str | None = None, dtype: str | None = None
) -> tuple[list[str], str]:
    """Write the toy example's images; return its spec entries and header comment."""
    from jmllm.joint.cli import load_builtin_model
    from jmllm.joint.toy.scenes import make_scene

    model = load_builtin_model(
        device=device if device not in (None, "auto") else "cpu",
        dtype=dtype,  # by name: jmllm-joint turns it into torch's
    )
    questions, passed_over = _toy_scenes(len(PAPER_QUESTIONS), model)
    entries = []
    for number, ((index, first, second, by_object), paper) in enumerate(
        zip(questions, PAPER_QUESTIONS, strict=True), start=1
    ):
        correct = paper[2]
        scene = make_scene("heldout", index)
        shown = by_object if correct == "A1" else by_object[::-1]
        names = [f"images/q{number}.png", f"images/q{number}_e1.png", f"images/q{number}_e2.png"]
        for name, im in zip(names, [scene.image, *shown], strict=True):
            atomic_write_bytes(out / name, _png(im))
        entries.append(
            f"  - id: q{number}\n"
            f"    # held-out toy scene {index}: {scene.caption}\n"
            f"    image: {names[0]}\n"
            f'    objects: ["{first}", "{second}"]\n'
            f"    explanations: [{names[1]}, {names[2]}]\n"
            f"    correct: {correct}\n"
        )
    header = (
        "# Example user study built from the toy world (jmllm-joint's built-in models): each\n"
        "# image is a held-out toy scene with two shapes, each explanation the toy J's GA box\n"
        "# view for one object (jmllm.joint.object_explanation). Correct answers follow the\n"
        "# paper's A1/A2 sequence. So that the key is what the pictures show, only scenes where\n"
        f"# each object's map peaks on that object are used ({passed_over} two-shape scenes passed\n"
        "# over); a real study keeps every question. Replace the images and objects with your\n"
        "# own for a real study.\n"
    )
    return entries, header


def _placeholder_entries(out: Path) -> tuple[list[str], str]:
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
    header = (
        "# Example user study with the structure of supplementary §3 of Giulivi & Boracchi (2024):\n"
        "# objects, correct answers and published rates (reference_share_correct) of the paper's\n"
        "# questions. The images are GENERATED PLACEHOLDERS: put your image and GA maps instead.\n"
    )
    return entries, header


def write_example(
    out_dir: str | Path,
    *,
    force: bool = False,
    source: str = "placeholders",
    device: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write ``study.yaml`` and its images into ``out_dir``.

    Args:
        out_dir: Folder to write into (created if missing); images go to ``images/``.
        force: Replace the ``study.yaml`` and example images of an earlier example, or write
            into a folder that holds other files. Without it, a folder that already holds any
            of them is left untouched (an edited spec is never lost); with it, a ``study.yaml``
            or ``images/`` that the example did not write is still never replaced.
        source: ``"toy"``: questions from the toy world's GA explanations (needs the
            ``joint`` extra; what ``jmllm-userstudy example`` writes); ``"placeholders"``: the
            paper's questions with generated placeholder images (no model needed).
        device: with ``source="toy"``, where the toy J runs (default: the CPU).
        dtype: with ``source="toy"``, its weights dtype (``"float32"``, ``"bfloat16"``,
            ``"float16"``; default or ``"auto"``: float32).

    Returns:
        The path of the spec file.

    Raises:
        ExampleExistsError: without ``force``, the folder already holds one of the files.
        MissingExtraError: ``source="toy"`` without ``jmllm-joint`` installed.

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
    if source not in EXAMPLE_SOURCES:
        raise UsageError(f"source: {source!r} is not one of {', '.join(EXAMPLE_SOURCES)}")
    out = Path(out_dir)
    existing = _existing(out)
    if existing and not force:
        more = (
            f" (and {len(existing) - 1} more of the example's files)" if len(existing) > 1 else ""
        )
        raise ExampleExistsError(
            f"{existing[0]} already exists{more}; nothing was written (use --force to replace them)"
        )
    if source == "toy":
        import importlib.util

        from .from_joint import MissingExtraError

        if importlib.util.find_spec("jmllm.joint") is None:
            raise MissingExtraError(
                "the toy-world example needs the optional extra: pip install "
                "'jmllm-userstudy[joint]' (or use --placeholders)"
            )
    check_output_dir(out, "example folder")
    # a folder with other files needs force, and even then no file the example did not write
    # (a user's own study.yaml or images/) is replaced
    claim_output_folder(out, EXAMPLE_COMMAND, ("study.yaml", "images"), force=force, what="out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    if source == "toy":
        entries, header = _toy_entries(out, device=device, dtype=dtype)
    else:
        entries, header = _placeholder_entries(out)
    spec = header + "title: Which explanation is for which object?\nseed: 2024\nquestions:\n"
    spec += "".join(entries)
    path = out / "study.yaml"
    atomic_write_text(path, spec)
    return path
