"""What the faithfulness benchmark explains, and the truth it scores against: the toy world's
scenes, a COCO-format dataset, or a CUB-style folder with ``boxes.csv``.

Every source yields items (images) and, per item, the explained targets: an answer of J, the
word (or the positions of the words) to explain, the object it names, and that object's true
boxes.

``toy`` (the toy world, :mod:`jmllm.joint.toy`)
    Held-out scenes. J answers ``What's in the image?`` greedily (``llava-1.5`` template); every
    object its answer names correctly (``<colour> <shape>``) is explained through its shape word,
    with every toy shape as a query (GA's default path on the toy world), against the object's
    true box.
``coco`` (:func:`jmllm.joint.audit.data.load_coco`)
    For every image and every annotated class with a box, J's answer is teacher-forced to
    ``The image shows a <class>`` ("an" before a vowel) and the class name's tokens are
    explained, with the class as the query, against all the boxes of that class.
``boxes`` (a folder with ``images/`` and ``boxes.csv``, :func:`jmllm.joint.wsol.read_wsol_folder`)
    The same for one object name given by the user (``bird`` for CUB-200-2011), against the
    image's boxes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE, get_template

# The answer form of the paper's WSOL check, with the object's name (articles as POPE writes them)
IN_IMAGE_QUESTION = "What's in the image?"
ANSWER_FORM = "The image shows a {}"
TOY_MAX_NEW_TOKENS = 24  # a toy caption of three objects is about 20 tokens


class FaithfulnessDataError(ValueError):
    """A faithfulness data source is malformed or empty; the message names it."""


@dataclass(frozen=True)
class Truth:
    """One explained target and the truth it is scored against.

    Attributes:
        answer: the answer the target is in (J's own, or teacher-forced text).
        target: a word of the answer, or the answer positions of a name of several words.
        occurrence: which occurrence of a repeated word.
        name: the object (``blue circle``, ``traffic light``).
        boxes: (G, 4) float ``x0, y0, x1, y1`` in the image's pixels, the object's extent (the
            pointing game's boxes).
        inclusive: (G, 4) the same boxes as MaxBoxAccV2 reads them (inclusive pixel corners).
        queries: the OWL-ViT queries GA uses.
    """

    answer: Any
    target: Any
    occurrence: int
    name: str
    boxes: np.ndarray
    inclusive: np.ndarray
    queries: tuple[str, ...]


@dataclass(frozen=True)
class Item:
    """One image of a source: its id, how to load it, the name shown in reports."""

    item_id: str
    source: str | os.PathLike[str] | Callable[[], Any]
    file: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def load(self) -> Any:
        """The image as :meth:`JointModel.embed` takes it (a path, or the PIL image)."""
        return self.source() if callable(self.source) else self.source


class Source:
    """A faithfulness data source (see the module docstring).

    Attributes:
        kind: ``toy``, ``coco`` or ``boxes``; name: what the report calls it.
        items: the images; prompt: the question; template: its conversation template.
    """

    kind = ""

    def __init__(self, name: str, items: Sequence[Item], template: str) -> None:
        self.name = name
        self.items = list(items)
        self.prompt = IN_IMAGE_QUESTION
        self.template = get_template(template).name

    def describe(self) -> dict[str, Any]:
        """The source's settings (they enter the run's settings digest)."""
        return {"kind": self.kind, "name": self.name, "template": self.template}

    def targets(self, model: Any, emb: Any, item: Item) -> tuple[list[Truth], int]:
        """The item's targets, and how many mentions could not be scored (counted)."""
        raise NotImplementedError


class ToySource(Source):
    """Held-out toy scenes; J's own greedy answers (see the module docstring).

    Args:
        scenes: how many held-out scenes; start: the first (default 1000, as the toy world's
            validity report); seed: the toy world's seed.
        template: the conversation template (default ``llava-1.5``).

    Example:
        >>> source = ToySource(scenes=2)
        >>> [item.item_id for item in source.items]
        ['heldout-1000', 'heldout-1001']
    """

    kind = "toy"

    def __init__(
        self,
        scenes: int = 100,
        start: int = 1000,
        seed: int = 0,
        template: str = INTERACTIVE_TEMPLATE,
    ) -> None:
        from jmllm.joint.toy.scenes import make_scene

        if scenes < 1 or start < 0:
            raise FaithfulnessDataError(
                f"toy scenes: need scenes >= 1 and start >= 0, got {scenes}, {start}"
            )
        self.seed = seed
        self.start = start

        def loader(index: int) -> Callable[[], Any]:
            return lambda: make_scene("heldout", index, seed).image

        items = [
            Item(f"heldout-{i}", loader(i), f"heldout scene {i}", {"index": i})
            for i in range(start, start + scenes)
        ]
        super().__init__(
            f"toy world, held-out scenes {start}–{start + scenes - 1}", items, template
        )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed, "start": self.start}

    def targets(self, model: Any, emb: Any, item: Item) -> tuple[list[Truth], int]:
        from jmllm.joint.toy.localisation import _mentions
        from jmllm.joint.toy.scenes import SHAPES, make_scene

        scene = make_scene("heldout", int(item.extra["index"]), self.seed)
        answer = model.generate(
            emb, self.prompt, max_new_tokens=TOY_MAX_NEW_TOKENS, template=self.template
        )[0]
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        truths, misnamed = [], 0
        for colour, shape, occurrence in _mentions(answer.text):
            obj = by_name.get((colour, shape))
            if obj is None:
                misnamed += 1  # a wrong or hallucinated object: no true box to score against
                continue
            box = np.array([obj.box], dtype=np.float64)
            inclusive = box - np.array([0, 0, 1, 1])  # the scene's ends are exclusive
            truths.append(Truth(answer, shape, occurrence, obj.name, box, inclusive, tuple(SHAPES)))
        return truths, misnamed


class BoxedSource(Source):
    """Images with labelled boxes; the answer teacher-forced to name each class in turn.

    Args:
        name: what the report calls the data.
        items: the images, each with ``extra["boxes"]``: class → (G, 4) boxes.
        template: the conversation template.
    """

    kind = "boxes"

    def targets(self, model: Any, emb: Any, item: Item) -> tuple[list[Truth], int]:
        from jmllm.joint.audit.data import question_text

        truths = []
        for class_name, boxes in item.extra["boxes"].items():
            text = question_text(class_name, ANSWER_FORM, "a-an")
            positions = name_positions(model, text, class_name)
            b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            truths.append(Truth(text, positions, 0, class_name, b, b.copy(), (class_name,)))
        return truths, 0


def name_positions(model: Any, text: str, name: str) -> list[int]:
    """The answer positions of the tokens that spell the last occurrence of ``name`` in
    ``text`` (J's tokenizer, as a teacher-forced answer is tokenised).

    Example:
        >>> name_positions(model, "The image shows a traffic light", "traffic light")  # doctest: +SKIP
        [4, 5]
    """
    from jmllm.joint.saliency import answer_tokens

    ids = model.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    decoded, tokens = answer_tokens(model.tokenizer, ids)
    start = decoded.rfind(name)
    if start < 0:
        raise FaithfulnessDataError(f"answer {text!r}: the tokenizer does not spell {name!r}")
    end = start + len(name)
    return [tok.position for tok in tokens if tok.start < end and tok.end > start]


def coco_source(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    limit: int | None = None,
    template: str = INTERACTIVE_TEMPLATE,
) -> BoxedSource:
    """A COCO-format dataset (``instances_*.json`` and its image folder) as a source.

    Images without any box are left out; classes of an image without a valid box are not
    explained (their count is :attr:`~jmllm.joint.audit.dataset.AuditDataset.skipped_boxes`).

    Raises:
        FaithfulnessDataError: malformed annotations, or no image with a box.

    Example:
        >>> source = coco_source("instances_val2017.json", "val2017", limit=100)  # doctest: +SKIP
    """
    from jmllm.joint.audit.data import AuditError, load_coco

    try:
        dataset = load_coco(annotations, images, limit=limit)
    except AuditError as exc:
        raise FaithfulnessDataError(str(exc)) from None
    items = []
    for image in dataset.images:
        boxes: dict[str, list[tuple[float, ...]]] = {}
        for class_name, box in image.boxes:
            boxes.setdefault(class_name, []).append(box)
        if boxes:
            items.append(Item(image.image_id, image.source, image.file, {"boxes": boxes}))
    if not items:
        raise FaithfulnessDataError(f"{annotations}: no image has a box to score against")
    source = BoxedSource(dataset.name, items, template)
    source.kind = "coco"
    return source


def boxes_source(
    data_dir: str | os.PathLike[str],
    name: str = "bird",
    limit: int | None = None,
    template: str = INTERACTIVE_TEMPLATE,
) -> BoxedSource:
    """A CUB-style folder (``images/`` and ``boxes.csv``) as a source; every image's boxes are
    of the object ``name`` (``bird`` for CUB-200-2011, the paper's WSOL word).

    Raises:
        FaithfulnessDataError: a malformed folder or boxes file (the file and line named).

    Example:
        >>> source = boxes_source("CUB_test/", "bird", limit=200)  # doctest: +SKIP
    """
    from jmllm.joint.wsol.run import WsolDataError, read_wsol_folder

    if not name.strip():
        raise FaithfulnessDataError("object name: empty")
    try:
        found = read_wsol_folder(data_dir)
    except WsolDataError as exc:
        raise FaithfulnessDataError(str(exc)) from None
    if limit is not None:
        found = found[:limit]
    items = [
        Item(w.image_id, w.path, w.image_id, {"boxes": {name.strip(): w.boxes.tolist()}})
        for w in found
    ]
    return BoxedSource(f"{os.fspath(data_dir)} ({name.strip()})", items, template)


__all__ = [
    "ANSWER_FORM",
    "IN_IMAGE_QUESTION",
    "BoxedSource",
    "FaithfulnessDataError",
    "Item",
    "Source",
    "ToySource",
    "Truth",
    "boxes_source",
    "coco_source",
    "name_positions",
]
