"""Synthetic scenes whose truth is known: coloured shapes on neutral backgrounds.

Every scene is a 128 × 128 RGB image (the toy OWL-ViT's input size) with 1–3 non-overlapping
objects, each one of :data:`SHAPES` in one of :data:`COLOURS`, of varied size and position, on a
plain, gradient or lightly textured background whose colours are neutral (grey with a faint
tint), never an object colour. A scene carries its ground truth:

- ``objects``: labelled boxes in pixels, ``x0, y0, x1, y1`` with ``x1``/``y1`` exclusive (the box
  of the pixels ``x0 ≤ x < x1``, ``y0 ≤ y < y1``), tight around the drawn pixels, listed **left to
  right** (by box centre x, then y);
- ``caption``: the objects in that order, ``"a red circle"``, ``"a red circle and a blue
  square"``, ``"a red circle, a blue square and a green triangle"``;
- ``questions``: (question, answer) pairs, each answerable from the pixels alone (see
  :func:`scene_questions`), including the paper's prompts (``"What's the content of the
  image?"`` → the caption; ``"What's in the image?"`` → ``"The image shows <caption>."``) and the
  hallucination question ``"Is there a {shape} in the image? Only answer with 'yes' or 'no'."``.

No two objects of a scene share both colour and shape, so every object has a unique name and a
caption's objects can be compared as a set (:func:`caption_objects`).

Scenes are deterministic functions of ``(split, index, seed)``: the random stream of scene
``index`` is ``numpy.random.SeedSequence(seed, spawn_key=(split code, index))``, so the
``train`` and ``heldout`` splits draw from disjoint streams whatever the counts.

Example:
    >>> from jmllm.joint.toy.scenes import make_scene
    >>> scene = make_scene("heldout", 0)
    >>> scene.image.size
    (128, 128)
    >>> scene.caption == scene_caption(scene.objects)
    True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128  # the toy OWL-ViT's input size (8 × 8 patches of 16 px)
# Shapes that stay distinct at two patches across (a star and a triangle did not, for a small ViT).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Saturated, well-separated hues; each object gets its colour jittered by up to COLOUR_JITTER.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (40, 165, 65),
    "blue": (45, 85, 220),
    "yellow": (230, 200, 35),
}
COLOUR_JITTER = 12
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "texture")
MIN_SIDE, MAX_SIDE = 22, 42  # object size in pixels (1.4 to 2.6 patches of 16 px)
GAP = 4  # pixels kept free between two objects' boxes
MAX_OBJECTS = 3
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}

# The paper's prompts (supplementary) and the authors' hallucination question, word for word.
CONTENT_QUESTION = "What's the content of the image?"
IN_IMAGE_QUESTION = "What's in the image?"
IN_IMAGE_PREFIX = "The image shows "
HALLUCINATION_QUESTION = "Is there a {} in the image? Only answer with 'yes' or 'no'."
COUNT_QUESTION = "How many objects are there?"
# How the yes/no questions are answered: LLaVA-1.5 answers "Yes"/"No", the only replies the
# authors' parse rule reads, and so does the shipped toy LLaVA (``CaptionerRecipe.yes_no``,
# default LLAVA_YES_NO); the toy worlds before 0.2 answered in lower case (YES_NO; docs/toy.md).
# Questions and scoring use YES_NO: answers are compared case-insensitively.
YES_NO = ("yes", "no")
LLAVA_YES_NO = ("Yes", "No")
YES_NO_KINDS = ("exists", "hallucination")
COLOUR_QUESTION = "What colour is the {}?"
SHAPE_QUESTION = "What shape is the {} object?"
EXISTS_QUESTION = "Is there a {}?"


@dataclass(frozen=True)
class ToyObject:
    """One drawn object: its shape, colour name and tight pixel box ``(x0, y0, x1, y1)``,
    ``x1``/``y1`` exclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        """``"<colour> <shape>"``, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class QA:
    """A question about a scene and its one correct answer. ``kind`` groups questions for
    reporting: ``content``, ``in_image``, ``count``, ``exists``, ``hallucination``, ``colour``,
    ``shape``."""

    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Scene:
    """A rendered scene and its truth (see the module docstring)."""

    split: str
    index: int
    seed: int
    image: Image.Image
    objects: tuple[ToyObject, ...]
    background: str
    caption: str
    questions: tuple[QA, ...]

    @property
    def boxes(self) -> np.ndarray:
        """(K, 4) float32 boxes ``x0, y0, x1, y1`` in pixels, left to right."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def labels(self) -> list[str]:
        """Object names (``"red circle"``), left to right."""
        return [o.name for o in self.objects]

    def to_record(self) -> dict[str, Any]:
        """The scene as one row of :func:`scenes_dataset` (PIL image, plain Python values)."""
        return {
            "image": self.image,
            "objects": {
                "bbox": [list(map(float, o.box)) for o in self.objects],
                "label": [o.name for o in self.objects],
                "shape": [o.shape for o in self.objects],
                "colour": [o.colour for o in self.objects],
            },
            "caption": self.caption,
            "questions": {
                "question": [q.question for q in self.questions],
                "answer": [q.answer for q in self.questions],
                "kind": [q.kind for q in self.questions],
            },
            "background": self.background,
            "split": self.split,
            "index": self.index,
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------------
# Truth in words


def scene_caption(objects: Sequence[ToyObject]) -> str:
    """The caption of objects already in left-to-right order.

    Example:
        >>> objs = [ToyObject("circle", "red", (0, 0, 1, 1)), ToyObject("square", "blue", (5, 0, 6, 1))]
        >>> scene_caption(objs)
        'a red circle and a blue square'
    """
    names = [f"a {o.name}" for o in objects]
    if not names:
        return "nothing"
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def scene_questions(objects: Sequence[ToyObject]) -> tuple[QA, ...]:
    """Every question whose answer the objects determine, with that answer.

    - the paper's two description prompts (caption; ``"The image shows <caption>."``);
    - ``"How many objects are there?"`` → ``"one"`` / ``"two"`` / ``"three"``;
    - for every shape: ``"Is there a <shape>?"`` and the authors' hallucination question
      ``"Is there a <shape> in the image? Only answer with 'yes' or 'no'."`` → ``"yes"``/``"no"``
      (:func:`with_yes_no` writes them another way, e.g. :data:`LLAVA_YES_NO`);
    - ``"What colour is the <shape>?"`` only when exactly one object has that shape;
    - ``"What shape is the <colour> object?"`` only when exactly one object has that colour.
    """
    caption = scene_caption(objects)
    out = [
        QA(CONTENT_QUESTION, caption, "content"),
        QA(IN_IMAGE_QUESTION, f"{IN_IMAGE_PREFIX}{caption}.", "in_image"),
        QA(COUNT_QUESTION, _number(len(objects)), "count"),
    ]
    shapes = Counter(o.shape for o in objects)
    colours = Counter(o.colour for o in objects)
    for shape in SHAPES:
        answer = YES_NO[0] if shapes[shape] else YES_NO[1]
        out.append(QA(EXISTS_QUESTION.format(shape), answer, "exists"))
        out.append(QA(HALLUCINATION_QUESTION.format(shape), answer, "hallucination"))
    for o in objects:
        if shapes[o.shape] == 1:
            out.append(QA(COLOUR_QUESTION.format(o.shape), o.colour, "colour"))
        if colours[o.colour] == 1:
            out.append(QA(SHAPE_QUESTION.format(o.colour), o.shape, "shape"))
    return tuple(out)


def with_yes_no(qa: QA, yes_no: Sequence[str]) -> QA:
    """``qa`` with a yes/no answer written as ``yes_no`` (other kinds unchanged).

    Example:
        >>> with_yes_no(QA("Is there a cross?", "no", "exists"), LLAVA_YES_NO).answer
        'No'
    """
    if qa.kind not in YES_NO_KINDS:
        return qa
    present = normalise_answer(qa.answer) == normalise_answer(YES_NO[0])
    return QA(qa.question, yes_no[0] if present else yes_no[1], qa.kind)


_OBJECT_RE = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE
)


def caption_objects(text: str) -> Counter[tuple[str, str]]:
    """The (colour, shape) pairs a caption mentions, with multiplicity.

    Only "<colour> <shape>" pairs count; a bare shape or colour is not an object mention.

    Example:
        >>> sorted(caption_objects("The image shows a red circle and a Blue square."))
        [('blue', 'square'), ('red', 'circle')]
    """
    return Counter((m.group(1).lower(), m.group(2).lower()) for m in _OBJECT_RE.finditer(text))


def caption_correct(text: str, objects: Sequence[ToyObject]) -> bool:
    """Whether ``text`` mentions exactly the scene's objects: the multiset of (colour, shape)
    pairs equals the one present (so a repeated or missing object is wrong).

    Example:
        >>> objs = [ToyObject("circle", "red", (0, 0, 1, 1))]
        >>> caption_correct("a red circle", objs), caption_correct("a red circle and a red circle", objs)
        (True, False)
    """
    return caption_objects(text) == Counter((o.colour, o.shape) for o in objects)


def normalise_answer(text: str) -> str:
    """Lower case, surrounding punctuation and spaces removed: what short answers compare by.

    Example:
        >>> normalise_answer(" Yes. ")
        'yes'
    """
    return text.strip().strip(".!?,;:'\"").strip().lower()


# ---------------------------------------------------------------------------------------------
# Rendering


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if index < 0:
        raise ValueError(f"index: must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLITS[split], index)))


def _neutral(rng: np.random.Generator, lo: float = 95.0, hi: float = 240.0) -> np.ndarray:
    """A grey with a faint tint (every channel within 10 of the grey level): never an object
    colour, whose channels differ by 100 or more."""
    grey = rng.uniform(lo, hi)
    return grey + rng.uniform(-10.0, 10.0, size=3)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """(size, size, 3) float32 background of a kind."""
    if kind == "plain":
        return np.broadcast_to(_neutral(rng), (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        a, b = _neutral(rng), _neutral(rng)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]  # (H, W, 1)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        return (a * (1 - ramp) + b * ramp).astype(np.float32)
    # texture: a smooth low-frequency pattern plus fine grain, small amplitude, grey only
    base = _neutral(rng, 110.0, 225.0)
    coarse = rng.normal(0.0, 1.0, size=(9, 9)).astype(np.float32)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    grain = rng.normal(0.0, 1.0, size=(size, size)).astype(np.float32)
    luminance = 7.0 * smooth + 3.0 * grain  # (H, W)
    return (base[None, None, :] + luminance[..., None]).astype(np.float32)


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape filling its square (before cropping to the tight box)."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    s = side - 1
    if shape == "circle":
        draw.ellipse([0, 0, s, s], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, s, s], fill=255)
    elif shape == "triangle":
        draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif shape == "cross":  # an upright plus sign, arms 0.36 of the side thick
        a, b = round(side * 0.32), round(side * 0.68) - 1
        draw.rectangle([a, 0, b, s], fill=255)
        draw.rectangle([0, a, s, b], fill=255)
    else:
        raise ValueError(f"shape: {shape!r} is not one of {', '.join(SHAPES)}")
    return np.asarray(canvas) > 127


def _tight(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels, exclusive ends."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _separated(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def make_scene(
    split: str,
    index: int,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    *,
    count: int | None = None,
    sides: tuple[int, int] | None = None,
) -> Scene:
    """Render scene ``index`` of a split, deterministically.

    Args:
        split: ``"train"`` or ``"heldout"`` (disjoint random streams).
        index: the scene's number in its split (>= 0).
        seed: the base seed of the world; the same (split, index, seed) gives the same scene.
        size: image side in pixels (object sizes scale with it).
        count: the number of objects instead of the world's 1–3 (e.g. 4: a scene *beyond* the
            toy world, to test what J does with it).
        sides: the objects' side range in pixels instead of the world's 22–42 (at ``size``
            128; e.g. ``(8, 14)`` or ``(60, 100)``: objects beyond the toy world).

    Returns:
        :class:`Scene` with its image and truth.

    Example:
        >>> a, b = make_scene("train", 3), make_scene("train", 3)
        >>> a.caption == b.caption and a.image.tobytes() == b.image.tobytes()
        True
    """
    rng = _rng(split, index, seed)
    scale = size / IMAGE_SIZE
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pixels = _background(rng, background, size)  # (H, W, 3) float32
    drawn = int(rng.integers(1, MAX_OBJECTS + 1))  # drawn either way: the stream stays the same
    count = drawn if count is None else count
    low, high = (round(MIN_SIDE * scale), round(MAX_SIDE * scale)) if sides is None else sides
    names = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = rng.choice(len(names), size=count, replace=False)  # unique (colour, shape) pairs
    placed: list[ToyObject] = []
    for k in chosen:
        colour, shape = names[int(k)]
        for _ in range(200):  # rejection sampling of a free spot; sizes shrink if it is crowded
            side = int(rng.integers(low, high + 1))
            mask = _shape_mask(shape, side)
            x = int(rng.integers(0, size - side + 1))
            y = int(rng.integers(0, size - side + 1))
            bx0, by0, bx1, by1 = _tight(mask)
            box = (x + bx0, y + by0, x + bx1, y + by1)
            if all(_separated(box, o.box, round(GAP * scale)) for o in placed):
                break
        else:  # 3 objects of at most 42 px always fit in 128 px; more or larger ones may not
            raise ValueError(f"scene {split}/{index}: no room for object {len(placed) + 1}")
        rgb = np.array(COLOURS[colour], dtype=np.float32)
        rgb = rgb + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        region = pixels[y : y + side, x : x + side]  # (side, side, 3) view
        region[mask] = rgb
        placed.append(ToyObject(shape, colour, box))
    objects = tuple(sorted(placed, key=lambda o: (o.centre[0], o.centre[1])))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return Scene(
        split=split,
        index=index,
        seed=seed,
        image=image,
        objects=objects,
        background=background,
        caption=scene_caption(objects),
        questions=scene_questions(objects),
    )


def iter_scenes(
    split: str, count: int, seed: int = 0, start: int = 0, size: int = IMAGE_SIZE
) -> Iterator[Scene]:
    """Scenes ``start … start + count - 1`` of a split.

    Example:
        >>> [s.index for s in iter_scenes("heldout", 2)]
        [0, 1]
    """
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    for index in range(start, start + count):
        yield make_scene(split, index, seed, size)


# ---------------------------------------------------------------------------------------------
# As a `datasets` dataset


def dataset_features() -> Any:
    """The ``datasets.Features`` of :func:`scenes_dataset` rows."""
    import datasets

    strings = datasets.List(datasets.Value("string"))
    return datasets.Features(
        {
            "image": datasets.Image(),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "label": strings,
                "shape": strings,
                "colour": strings,
            },
            "caption": datasets.Value("string"),
            "questions": {"question": strings, "answer": strings, "kind": strings},
            "background": datasets.Value("string"),
            "split": datasets.Value("string"),
            "index": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
        }
    )


def scenes_dataset(split: str, count: int, seed: int = 0, start: int = 0) -> Any:
    """Scenes as a ``datasets.Dataset``: ``image`` (PNG), ``objects`` (``bbox`` xyxy pixels with
    exclusive ends, ``label``, ``shape``, ``colour``), ``caption``, ``questions`` (``question``,
    ``answer``, ``kind``), ``background``, ``split``, ``index``, ``seed``.

    Write it where ``jmllm-align train`` reads it with ``dataset.to_parquet(folder /
    "train.parquet")`` and ``--dataset folder``.

    Example:
        >>> ds = scenes_dataset("heldout", 4)
        >>> ds[0]["caption"] == make_scene("heldout", 0).caption
        True
    """
    import datasets

    records = [s.to_record() for s in iter_scenes(split, count, seed, start)]
    columns = {key: [r[key] for r in records] for key in dataset_features()}
    return datasets.Dataset.from_dict(columns, features=dataset_features())


def scene_from_record(record: dict[str, Any]) -> Scene:
    """Rebuild a :class:`Scene` from a :func:`scenes_dataset` row (image decoded to PIL)."""
    image = record["image"]
    if not isinstance(image, Image.Image):
        raise ValueError("record: its image is not decoded (cast the column with decode=True)")
    objs = record["objects"]
    objects = tuple(
        ToyObject(shape, colour, tuple(int(v) for v in box))  # type: ignore[arg-type]
        for box, shape, colour in zip(objs["bbox"], objs["shape"], objs["colour"], strict=True)
    )
    qs = record["questions"]
    questions = tuple(
        QA(q, a, k) for q, a, k in zip(qs["question"], qs["answer"], qs["kind"], strict=True)
    )
    return Scene(
        split=record["split"],
        index=int(record["index"]),
        seed=int(record["seed"]),
        image=image.convert("RGB"),
        objects=objects,
        background=record["background"],
        caption=record["caption"],
        questions=questions,
    )


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "CONTENT_QUESTION",
    "HALLUCINATION_QUESTION",
    "IMAGE_SIZE",
    "IN_IMAGE_PREFIX",
    "IN_IMAGE_QUESTION",
    "LLAVA_YES_NO",
    "QA",
    "SHAPES",
    "YES_NO",
    "Scene",
    "ToyObject",
    "caption_correct",
    "caption_objects",
    "iter_scenes",
    "make_scene",
    "normalise_answer",
    "scene_caption",
    "scene_from_record",
    "scene_questions",
    "scenes_dataset",
    "with_yes_no",
]
