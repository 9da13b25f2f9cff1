"""Is an image a toy scene, and does J's answer agree with what it detects? The toy J's checks.

The toy world's models know coloured shapes on neutral backgrounds and nothing else; given a
photo, a blank image or a crowded scene they still answer, confidently and wrongly. So the toy J
(:func:`jmllm.joint.toy.load_toy_joint`) checks each image it embeds and logs a warning for one
that is not like its scenes. The rule is simple and documented (docs/toy.md). A pixel is
*coloured* when its largest and smallest channels differ by more than :data:`CHROMA_MIN`;
a coloured pixel is *on-palette* within :data:`PALETTE_DISTANCE` (RGB Euclidean) of one of the
four object colours, *off-palette* otherwise. An image is not a toy scene when

- it is not :data:`~jmllm.joint.toy.scenes.IMAGE_SIZE` × ``IMAGE_SIZE`` pixels (every toy
  scene is 128 × 128);
- fewer than :data:`MIN_OBJECT_PIXELS` pixels are on-palette: no object at all (a blank or a
  desaturated image; the smallest toy object covers about 250);
- more than :data:`COLOURED_LIMIT` of its pixels are coloured (toy backgrounds are grey with a
  faint tint; three objects cover at most about a quarter of a scene);
- more than :data:`OFF_PALETTE_LIMIT` of its pixels, or more than :data:`OFF_PALETTE_RATIO` of
  its coloured pixels, are off-palette (a photo's colours are anything; a scene's are the four
  object colours, and the few other colours JPEG compression and blurring leave on objects'
  edges).

The thresholds keep every one of 500 held-out scenes saved as PNG, as JPEG at quality 95, 75
or 50, blurred by 1 px, or blurred and saved at quality 75 (0 false alarms), and flag every
blank, greyscale and photo crop of the check in ``tests/test_toy_inputs.py``.

An image can pass and still be beyond what the toy world knows (four objects, objects far smaller
or larger than its 22–42 px): :func:`toy_answer_problem` then compares J's answer with OWL-ViT's
detections on the same embedding and says when they disagree on the objects in the image.

Example:
    >>> from jmllm.joint.toy.scenes import make_scene
    >>> toy_image_problem(make_scene("heldout", 0).image) is None
    True
    >>> toy_image_problem(Image.new("RGB", (640, 480)))
    '640 × 480 pixels, not a 128 × 128 toy scene'
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from jmllm.joint.toy.scenes import COLOURS, IMAGE_SIZE

CHROMA_MIN = 40  # a pixel whose channels differ by more than this is coloured, not grey
PALETTE_DISTANCE = 60.0  # farther than this from every object colour: off-palette
MIN_OBJECT_PIXELS = 150  # on-palette pixels below this: no object (toy scenes: 200 or more)
COLOURED_LIMIT = 0.45  # share of coloured pixels above which an image is not a scene (≤ 0.27)
OFF_PALETTE_LIMIT = 0.08  # share of off-palette pixels above which it is not (toy: ≤ 0.053)
OFF_PALETTE_RATIO = 0.55  # off-palette share of the coloured pixels above which… (≤ 0.50)
ANSWER_CHECK_THRESHOLD = 0.5  # detections that count as an object the detector sees
ANSWER_CHECK_OVERLAP = 0.1  # boxes overlapping a higher-scored one this much are one object
TOY_WARNING = (
    "the toy world's models know only coloured shapes (circle, square, triangle, cross in red, "
    "green, blue, yellow) on plain backgrounds; their answer, boxes and maps for this image "
    "mean nothing. Use real checkpoints (--owl/--mllm/--alignment) for photos."
)


def palette_counts(pixels: np.ndarray) -> tuple[int, int]:
    """(on-palette, off-palette) coloured pixels of an (H, W, 3) RGB array (see the module
    docstring).

    Example:
        >>> palette_counts(np.full((4, 4, 3), 128, dtype=np.uint8))
        (0, 0)
    """
    rgb = pixels.reshape(-1, 3).astype(np.float32)
    coloured = (rgb.max(axis=1) - rgb.min(axis=1)) > CHROMA_MIN
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (4, 3)
    distance = np.sqrt(((rgb[:, None, :] - palette[None]) ** 2).sum(-1)).min(axis=1)
    near = distance <= PALETTE_DISTANCE
    return int((coloured & near).sum()), int((coloured & ~near).sum())


def off_palette_share(pixels: np.ndarray) -> float:
    """Share of off-palette pixels in an (H, W, 3) RGB array (see the module docstring).

    Example:
        >>> off_palette_share(np.full((4, 4, 3), 128, dtype=np.uint8))
        0.0
    """
    total = pixels.shape[0] * pixels.shape[1] if pixels.ndim == 3 else 0
    return palette_counts(pixels)[1] / total if total else 0.0


def toy_image_problem(image: Any, size: tuple[int, int] | None = None) -> str | None:
    """Why ``image`` is not a toy scene, in a few words; None when it looks like one.

    Args:
        image: a PIL image, or a (3, H, W) uint8 tensor / array (the decoded working copy).
        size: the original ``(width, height)`` when ``image`` is a resized working copy.

    Returns:
        None, or e.g. ``"640 × 480 pixels, not a 128 × 128 toy scene"``.
    """
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"))
    else:
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        pixels = np.transpose(array, (1, 2, 0))
    width, height = size if size is not None else (pixels.shape[1], pixels.shape[0])
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        return f"{width} × {height} pixels, not a {IMAGE_SIZE} × {IMAGE_SIZE} toy scene"
    on, off = palette_counts(pixels)
    total = pixels.shape[0] * pixels.shape[1]
    if on < MIN_OBJECT_PIXELS:
        return (
            f"only {on} pixels have an object colour (red, green, blue or yellow): no object "
            f"of a toy scene's size (a toy scene has at least {MIN_OBJECT_PIXELS})"
        )
    if (on + off) / total > COLOURED_LIMIT:
        return (
            f"{(on + off) / total:.0%} of its pixels are coloured; a toy scene's background is "
            f"grey (limit {COLOURED_LIMIT:.0%})"
        )
    if off / total > OFF_PALETTE_LIMIT or off / (on + off) > OFF_PALETTE_RATIO:
        return (
            f"{off / total:.0%} of its pixels ({off / (on + off):.0%} of the coloured ones) have "
            "colours no toy object has"
        )
    return None


def toy_input_check(image: Any, size: tuple[int, int] | None = None) -> str | None:
    """The toy J's :attr:`~jmllm.joint.JointModel.input_check`: the problem and
    :data:`TOY_WARNING`, or None for an image like a toy scene.

    Example:
        >>> toy_input_check(Image.new("RGB", (64, 64))).startswith("64 × 64 pixels")
        True
    """
    problem = toy_image_problem(image, size)
    return None if problem is None else f"{problem}: {TOY_WARNING}"


def toy_answer_problem(answer: str, detections: Any) -> str | None:
    """Whether an answer and the detector disagree on how many objects the image holds: the
    objects the answer names (``<colour> <shape>``) against OWL-ViT's shape detections on the
    same embedding scored at least :data:`ANSWER_CHECK_THRESHOLD` (toy objects never overlap,
    so boxes overlapping a higher-scored one by :data:`ANSWER_CHECK_OVERLAP` are one object,
    whatever their shapes). An answer that names no object (e.g. ``"blue"``) is not checked.

    Args:
        answer: J's answer.
        detections: :class:`~jmllm.joint.detection.Detections` of the four toy shapes.

    Returns:
        None, or e.g. ``"the answer names 3 object(s) (1 × circle, 2 × cross) but the detector
        sees 4 (1 × circle, 1 × square, 2 × cross) …"``.

    Example:
        >>> toy_answer_problem("blue", detections) is None  # doctest: +SKIP
        True
    """
    from jmllm.joint.toy.scenes import SHAPES, caption_objects

    named = caption_objects(answer)
    if not named:
        return None
    seen = _distinct_objects(detections)
    said = Counter(shape for (_, shape), n in named.items() for _ in range(n))
    # counts, not shapes: the detector confuses shapes now and then (its AP50 is 0.96–0.98),
    # but on toy-like objects it rarely sees one object too many or too few
    if sum(said.values()) == sum(seen.values()):
        return None

    def listing(counts: Counter[str]) -> str:
        return ", ".join(f"{counts[s]} × {s}" for s in SHAPES if counts[s]) or "none"

    return (
        f"the answer names {sum(said.values())} object(s) ({listing(said)}) but the detector "
        f"sees {sum(seen.values())} ({listing(seen)}) in the same embedding: this image may be "
        "unlike the toy scenes (1 to 3 objects of 22 to 42 px), and the answer wrong"
    )


def _distinct_objects(detections: Any) -> Counter[str]:
    """Shape counts of the detections at or above the threshold, one per object (class-agnostic
    suppression of overlapping boxes, highest score first)."""
    from jmllm.joint.detection.heads import nms

    scores = detections.scores.float()
    strong = (scores >= ANSWER_CHECK_THRESHOLD).nonzero().flatten()
    kept = nms(detections.boxes[strong].float(), scores[strong], ANSWER_CHECK_OVERLAP)
    names = detections.names
    return Counter(names[int(strong[k])] for k in kept)


def toy_answer_check(model: Any, emb: Any, answers: Any) -> list[str | None]:
    """:func:`toy_answer_problem` for each answer of a batch (one per image of ``emb``), the
    detections computed on the same embedding for the four toy shapes.

    Example:
        >>> toy_answer_check(model, emb, [answer.text])  # doctest: +SKIP
        [None]
    """
    from jmllm.joint.toy.scenes import SHAPES

    detections = model.detect(emb, list(SHAPES), threshold=ANSWER_CHECK_THRESHOLD)
    return [toy_answer_problem(str(a), d) for a, d in zip(answers, detections, strict=True)]


__all__ = [
    "TOY_WARNING",
    "off_palette_share",
    "palette_counts",
    "toy_answer_check",
    "toy_answer_problem",
    "toy_image_problem",
    "toy_input_check",
]
