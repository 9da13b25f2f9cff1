"""Datasets and question plans of the hallucination audit (DESIGN §1.4).

An audit dataset is a list of images, each with the set of object classes annotated in it, and
the class vocabulary. Two sources:

- a **COCO-format** annotation file (``instances_*.json``: ``images``, ``annotations``,
  ``categories``) and the folder of its images (:func:`load_coco`);
- a **datasets** dataset with an image column and an objects column holding each object's
  category (:func:`load_objects_dataset`), e.g. ``detection-datasets/coco`` saved locally.

For every image, :func:`plan_questions` chooses which classes J is asked about:

``all`` (default, the authors' protocol)
    every present class (a "no" is a negative hallucination) and every absent class of the
    vocabulary (a "yes" is a positive hallucination): 80 questions per COCO image.
``random`` / ``popular`` / ``adversarial`` (POPE, Li et al., EMNLP 2023)
    images with at least ``k`` present classes; the first ``k`` present classes (annotation
    order) as positives and, for each, one absent class as a negative: drawn uniformly among the
    classes seen in the audited images (``random``, seeded per image), the most frequent such
    class (``popular``: by the number of audited images that contain it), or the class that
    co-occurs most often with that positive (``adversarial``); when no class is left by the
    frequency rules, a random one.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jmllm.align.files import read_json, resolve_inside
from jmllm.align.options import clip

SAMPLINGS = ("all", "random", "popular", "adversarial")
Sampling = Literal["all", "random", "popular", "adversarial"]


class AuditError(ValueError):
    """Bad audit input (dataset, options, output folder); the message names it and says why."""


@dataclass(frozen=True)
class AuditImage:
    """One image of an audit dataset.

    Attributes:
        image_id: a stable identifier (COCO's image id as text, or the dataset row).
        source: a path, or a callable returning the decoded PIL image (datasets rows).
        present: the annotated classes, each once, in the order of their first annotation.
        file: the name shown in reports (COCO ``file_name``).
        boxes: the annotated boxes, ``(class, (x0, y0, x1, y1))`` in the image's pixels
            (COCO's ``[x, y, w, h]`` as ``x0 = x, x1 = x + w``), for the checks that need
            localisation truth (:mod:`jmllm.joint.faithfulness`); empty where the source has
            none.
    """

    image_id: str
    source: str | os.PathLike[str] | Callable[[], Any]
    present: tuple[str, ...]
    file: str
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()

    def boxes_of(self, class_name: str) -> list[tuple[float, float, float, float]]:
        """The annotated boxes of one class (empty when none was given).

        Example:
            >>> AuditImage("1", "a.jpg", ("cat",), "a.jpg",
            ...            (("cat", (1.0, 2.0, 5.0, 6.0)),)).boxes_of("cat")
            [(1.0, 2.0, 5.0, 6.0)]
        """
        return [box for name, box in self.boxes if name == class_name]

    def load(self) -> Any:
        """The image as :meth:`JointModel.embed` takes it (a path, or the PIL image)."""
        return self.source() if callable(self.source) else self.source

    def fingerprint(self) -> str:
        """SHA-256 of the image's file (a datasets row: of its encoded bytes, else its pixels):
        a resumed audit keeps an image's answers only while the image is the same.

        Raises:
            OSError: the file cannot be read.
        """
        if callable(self.source):
            row_fingerprint = getattr(self.source, "fingerprint", None)
            if row_fingerprint is not None:
                return str(row_fingerprint())
            return _pixels_fingerprint(self.source())
        return _file_fingerprint(self.source)


@dataclass(frozen=True)
class AuditDataset:
    """The images of an audit and the class vocabulary (COCO: the 80 category names)."""

    classes: tuple[str, ...]
    images: tuple[AuditImage, ...]
    name: str = "dataset"
    skipped_annotations: int = 0  # annotations naming an unknown image or category
    skipped_boxes: int = 0  # annotations kept for presence whose bbox is missing or malformed

    def __len__(self) -> int:
        return len(self.images)

    def head(self, limit: int | None) -> AuditDataset:
        """The first ``limit`` images (the authors audit the first 1,000 COCO images)."""
        if limit is None:
            return self
        if limit < 1:
            raise AuditError(f"limit: must be at least 1, got {limit}")
        return replace(self, images=self.images[:limit])


@dataclass(frozen=True)
class PlannedQuestion:
    """One question of the plan: a class and whether it is annotated in the image."""

    class_name: str
    present: bool


@dataclass
class QuestionPlan:
    """What J is asked about each image.

    Attributes:
        questions: image id → its questions, in asking order.
        sampling, k, seed: how they were chosen.
        excluded: ids of images left out (POPE: fewer than ``k`` present classes).
        short: ids of images that got fewer negatives than positives (no absent class left).
    """

    questions: dict[str, list[PlannedQuestion]]
    sampling: str
    k: int
    seed: int
    excluded: list[str] = field(default_factory=list)
    short: list[str] = field(default_factory=list)

    @property
    def num_questions(self) -> int:
        return sum(len(q) for q in self.questions.values())


# ---------------------------------------------------------------------------------------------
# COCO format
# ---------------------------------------------------------------------------------------------


def _file_fingerprint(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pixels_fingerprint(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return _file_fingerprint(image)
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise AuditError(f"{path}: no such annotation file")
    try:
        return read_json(path)
    except ValueError as exc:  # one line: malformed, too deeply nested, not UTF-8
        raise AuditError(str(exc)) from None


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        shown = (
            clip(repr(name))
            if isinstance(name, (str, int, float, type(None)))
            else type(name).__name__
        )
        raise AuditError(f"{where}: category name must be a non-empty string, got {shown}")
    return " ".join(name.split())


def _check_id(value: object, where: str) -> int | str:
    """An id as the file gives it: an integer or a string (compared by type and value)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AuditError(f"{where}: must be an integer or a string, got {type(value).__name__}")
    return value


def _id_text(value: int | str) -> str:
    return str(value)


def load_coco(
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    limit: int | None = None,
) -> AuditDataset:
    """A COCO-format annotation file and its image folder as an audit dataset.

    Every annotation counts, crowd regions included (as ``pycocotools``' ``getAnnIds`` returns
    them by default); images without annotations are kept (they get only absent classes).
    Annotations naming an unknown image or category are skipped and counted. Each annotation's
    ``bbox`` is kept in :attr:`AuditImage.boxes` (a missing or malformed one is counted in
    ``skipped_boxes``; the class still counts as present).

    Args:
        annotations: the ``instances_*.json`` file (``images``, ``annotations``, ``categories``).
        images: the folder the images' ``file_name`` are relative to.
        limit: audit only the first ``limit`` images (file order).

    Returns:
        :class:`AuditDataset`; classes in category order.

    Raises:
        AuditError: unreadable or malformed annotations, a missing image folder.

    Example:
        >>> ds = load_coco("annotations/instances_val2017.json", "val2017")  # doctest: +SKIP
        >>> len(ds.classes), ds.images[0].present  # doctest: +SKIP
        (80, ('person', 'bicycle'))
    """
    path = Path(annotations)
    folder = Path(images)
    if not folder.is_dir():
        raise AuditError(f"{folder}: no such image folder")
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise AuditError(f"{path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(doc.get(key), list):
            raise AuditError(f"{path}: '{key}' is missing or not a list")
    anns = doc.get("annotations", [])
    if not isinstance(anns, list):
        raise AuditError(f"{path}: 'annotations' is not a list")
    categories: dict[int | str, str] = {}
    classes: list[str] = []
    for i, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise AuditError(f"{path}: categories[{i}] has no 'id'")
        cat_id = _check_id(cat["id"], f"{path}: categories[{i}].id")
        if cat_id in categories:
            raise AuditError(f"{path}: categories[{i}].id {clip(repr(cat_id))} appears twice")
        name = _check_name(cat.get("name"), f"{path}: categories[{i}].name")
        categories[cat_id] = name
        if name not in classes:
            classes.append(name)
    if not classes:
        raise AuditError(f"{path}: no categories")
    present: dict[int | str, list[str]] = {}
    as_text: dict[str, int | str] = {}  # results and reports name images by their id as text
    order: list[tuple[int | str, str, Path]] = []
    for i, img in enumerate(doc["images"]):
        if (
            not isinstance(img, dict)
            or "id" not in img
            or not isinstance(img.get("file_name"), str)
        ):
            raise AuditError(f"{path}: images[{i}] needs an 'id' and a 'file_name'")
        image_id = _check_id(img["id"], f"{path}: images[{i}].id")
        if image_id in present:
            raise AuditError(f"{path}: images[{i}].id {clip(repr(image_id))} appears twice")
        text = _id_text(image_id)
        if text in as_text:
            raise AuditError(
                f"{path}: images[{i}].id {clip(repr(image_id))} and id "
                f"{clip(repr(as_text[text]))} are both {clip(text)!r} as text; give every "
                "image a distinct id"
            )
        try:
            source = resolve_inside(folder, img["file_name"], f"{path}: images[{i}].file_name")
        except ValueError as exc:
            raise AuditError(str(exc)) from None
        present[image_id] = []
        as_text[text] = image_id
        order.append((image_id, img["file_name"], source))
    skipped = skipped_boxes = 0
    boxes: dict[Any, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            skipped += 1
            continue
        for key in ("image_id", "category_id"):
            if key in ann:
                _check_id(ann[key], f"{path}: annotations[{i}].{key}")
        image_key, category_key = ann.get("image_id"), ann.get("category_id")
        names = present.get(image_key) if isinstance(image_key, int | str) else None  # 1 is not "1"
        category = categories.get(category_key) if isinstance(category_key, int | str) else None
        if names is None or category is None:
            skipped += 1
            continue
        if category not in names:
            names.append(category)
        box = _coco_box(ann.get("bbox"))
        if box is None:
            skipped_boxes += 1
        else:
            boxes.setdefault(ann["image_id"], []).append((category, box))
    items = tuple(
        AuditImage(
            image_id=_id_text(image_id),
            source=source,
            present=tuple(present[image_id]),
            file=file_name,
            boxes=tuple(boxes.get(image_id, ())),
        )
        for image_id, file_name, source in order
    )
    dataset = AuditDataset(
        tuple(classes),
        items,
        name=path.name,
        skipped_annotations=skipped,
        skipped_boxes=skipped_boxes,
    )
    return dataset.head(limit)


def _coco_box(bbox: Any) -> tuple[float, float, float, float] | None:
    """COCO's ``[x, y, w, h]`` as ``(x0, y0, x1, y1)``; None when missing, malformed, non-finite,
    negative or empty."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if not all(np.isfinite((x, y, w, h))) or x < 0 or y < 0 or w <= 0 or h <= 0:
        return None
    return (x, y, x + w, y + h)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def _category_names(feature: Any, field_name: str) -> list[str] | None:
    """ClassLabel names of the objects' category field, whatever nesting datasets uses."""
    inner = feature
    for _ in range(4):
        if hasattr(inner, "names") and isinstance(inner.names, list):
            return [str(n) for n in inner.names]
        if isinstance(inner, dict):
            inner = inner.get(field_name)
        elif isinstance(inner, list) and inner:
            inner = inner[0]
        elif hasattr(inner, "feature"):
            inner = inner.feature
        else:
            return None
    return None


def _object_categories(objects: Any, field_name: str, row: int) -> list[Any]:
    if isinstance(objects, dict):
        values = objects.get(field_name)
    elif isinstance(objects, list):
        values = [o.get(field_name) if isinstance(o, dict) else None for o in objects]
    else:
        values = None
    if not isinstance(values, list) or any(v is None for v in values):
        raise AuditError(f"row {row}: objects have no '{field_name}' for every object")
    return values


def load_objects_dataset(
    dataset: Any,
    split: str | None = None,
    image_column: str = "image",
    objects_column: str = "objects",
    category_field: str = "category",
    id_column: str | None = "image_id",
    limit: int | None = None,
) -> AuditDataset:
    """A ``datasets`` dataset with objects as an audit dataset.

    Args:
        dataset: a ``datasets.Dataset``, a folder saved with ``save_to_disk``, or a name that
            ``datasets.load_dataset`` resolves (offline: from its cache).
        split: the split to use (needed for names and ``DatasetDict`` folders).
        image_column: the column of images (decoded PIL images or paths).
        objects_column: the column of objects: a dict of lists or a list of dicts.
        category_field: the objects' category field: class indices (a ``ClassLabel``) or names.
        id_column: the column of image ids, if the dataset has it (otherwise the row number).
        limit: audit only the first ``limit`` rows.

    Returns:
        :class:`AuditDataset`; classes from the ``ClassLabel`` names, else the names seen.

    Example:
        >>> ds = load_objects_dataset("coco-val-saved", split="val")  # doctest: +SKIP
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - the [datasets] extra
        raise AuditError(
            "--dataset needs the datasets package: pip install 'jmllm-joint[datasets]'"
        ) from None
    info = getattr(dataset, "info", None)
    name = str(getattr(info, "dataset_name", None) or "dataset")
    if isinstance(dataset, (str, os.PathLike)):
        name = str(dataset)
        try:
            if Path(dataset).is_dir():
                dataset = datasets.load_from_disk(str(dataset))
            else:
                dataset = datasets.load_dataset(str(dataset), split=split)
        except (OSError, ValueError, FileNotFoundError) as exc:
            raise AuditError(f"{name}: cannot load the dataset ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split is None or split not in dataset:
            raise AuditError(
                f"{name}: has splits {sorted(dataset)}; choose one with split= (--split)"
            )
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise AuditError(
            f"{name}: expected a datasets.Dataset (random access), got {type(dataset).__name__}"
        )
    for column in (image_column, objects_column):
        if column not in dataset.column_names:
            raise AuditError(f"{name}: no column {column!r} (columns: {dataset.column_names})")
    rows = len(dataset) if limit is None else min(limit, len(dataset))
    if limit is not None and limit < 1:
        raise AuditError(f"limit: must be at least 1, got {limit}")
    vocabulary = _category_names(dataset.features[objects_column], category_field)
    objects = dataset.select_columns([objects_column])
    ids = dataset[id_column][:rows] if id_column and id_column in dataset.column_names else None
    images_only = dataset.select_columns([image_column])
    seen: list[str] = []
    items = []
    for row in range(rows):
        cats = _object_categories(objects[row][objects_column], category_field, row)
        names: list[str] = []
        for value in cats:
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                if vocabulary is None or not 0 <= int(value) < len(vocabulary):
                    raise AuditError(f"row {row}: category {value} has no class name")
                label = vocabulary[int(value)]
            else:
                label = _check_name(value, f"row {row}")
            if label not in names:
                names.append(label)
            if label not in seen:
                seen.append(label)
        image_id = str(ids[row]) if ids is not None else str(row)
        items.append(
            AuditImage(
                image_id=image_id,
                source=_RowImage(images_only, row, image_column),
                present=tuple(names),
                file=f"{name}[{row}]",
            )
        )
    if len({item.image_id for item in items}) != len(items):
        raise AuditError(f"{name}: column {id_column!r} has repeated image ids")
    classes = tuple(vocabulary) if vocabulary is not None else tuple(seen)
    if not classes:
        raise AuditError(f"{name}: no object classes")
    return AuditDataset(classes, tuple(items), name=name)


@dataclass(frozen=True)
class _RowImage:
    """A zero-argument loader of one row's image (decoded only when the audit reaches it)."""

    dataset: Any
    row: int
    column: str

    def __call__(self) -> Any:
        import io

        from PIL import Image

        value = self.dataset[self.row][self.column]
        if isinstance(value, dict):  # an Image feature with decode=False
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"]))
            value = value.get("path")
        return value

    def fingerprint(self) -> str:
        """SHA-256 of the row's encoded image (its bytes or file), else of its pixels."""
        value = self.dataset[self.row][self.column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return hashlib.sha256(value["bytes"]).hexdigest()
            value = value.get("path")
        return _pixels_fingerprint(value)


# ---------------------------------------------------------------------------------------------
# Question plans
# ---------------------------------------------------------------------------------------------


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    # one stream per image: the plan of an image does not depend on the others, on their order
    # or on how the work is split between processes
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8"))])


def plan_questions(
    dataset: AuditDataset, sampling: Sampling | str = "all", k: int = 3, seed: int = 0
) -> QuestionPlan:
    """Which classes J is asked about, per image (see the module docstring).

    Args:
        dataset: the images and the class vocabulary.
        sampling: ``all`` (the authors' protocol), ``random``, ``popular`` or ``adversarial``.
        k: POPE: positives (and negatives) per image.
        seed: seed of the random choices (one stream per image).

    Returns:
        :class:`QuestionPlan`.

    Example:
        >>> ds = AuditDataset(("cat", "dog", "car"), (AuditImage("1", "a.jpg", ("cat",), "a.jpg"),))
        >>> [(q.class_name, q.present) for q in plan_questions(ds).questions["1"]]
        [('cat', True), ('dog', False), ('car', False)]
    """
    if sampling not in SAMPLINGS:
        raise AuditError(f"sampling: {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    if not isinstance(k, int) or k < 1:
        raise AuditError(f"k: must be a positive integer, got {k!r}")
    plan = QuestionPlan({}, sampling, k, seed)
    if sampling == "all":
        for image in dataset.images:
            present = list(image.present)
            absent = [c for c in dataset.classes if c not in image.present]
            plan.questions[image.image_id] = [PlannedQuestion(c, True) for c in present] + [
                PlannedQuestion(c, False) for c in absent
            ]
        return plan
    eligible = [image for image in dataset.images if len(image.present) >= k]
    plan.excluded = [image.image_id for image in dataset.images if len(image.present) < k]
    rank = {c: i for i, c in enumerate(dataset.classes)}

    def by_vocabulary(name: str) -> int:
        return rank.get(name, len(rank))

    frequency: Counter[str] = Counter()
    co_occurrence: dict[str, Counter[str]] = {}
    for image in eligible:
        frequency.update(image.present)
        for a in image.present:
            co_occurrence.setdefault(a, Counter()).update(b for b in image.present if b != a)
    pool = sorted(frequency, key=by_vocabulary)  # the classes seen in the audited images
    popular = sorted(pool, key=lambda c: (-frequency[c], by_vocabulary(c)))
    for image in eligible:
        rng = _image_rng(seed, image.image_id)
        asked: list[PlannedQuestion] = []
        used = set(image.present)
        for positive in image.present[:k]:
            asked.append(PlannedQuestion(positive, True))
            if sampling == "popular":
                ranked: Sequence[str] = popular
            elif sampling == "adversarial":
                partners = co_occurrence.get(positive, Counter())
                ranked = sorted(partners, key=lambda c: (-partners[c], by_vocabulary(c)))
            else:
                ranked = ()
            negative = next((c for c in ranked if c not in used), None)
            if negative is None:
                left = [c for c in pool if c not in used]
                negative = left[int(rng.integers(len(left)))] if left else None
            if negative is None:
                continue
            used.add(negative)
            asked.append(PlannedQuestion(negative, False))
        if sum(not q.present for q in asked) < k:
            plan.short.append(image.image_id)
        plan.questions[image.image_id] = asked
    return plan


AUTHORS_QUESTION = "Is there a {} in the image? Only answer with 'yes' or 'no'."
ARTICLES = ("a", "a-an")


def question_text(class_name: str, question: str = AUTHORS_QUESTION, articles: str = "a") -> str:
    """The question about ``class_name``.

    Args:
        class_name: the class, as the vocabulary names it.
        question: a format string with one ``{}``; default the authors' question.
        articles: ``a`` keeps the question as written (the authors ask "Is there a apple");
            ``a-an`` writes "an" before a vowel-initial class when the placeholder follows "a "
            (POPE's published questions).

    Example:
        >>> question_text("apple", articles="a-an")
        "Is there an apple in the image? Only answer with 'yes' or 'no'."
    """
    if articles not in ARTICLES:
        raise AuditError(f"articles: {articles!r} is not one of {', '.join(ARTICLES)}")
    vowel = bool(class_name) and class_name[0].lower() in "aeiou"
    if articles == "a-an" and vowel and " a {}" in question:
        question = question.replace(" a {}", " an {}", 1)
    return question.format(class_name)


__all__ = [
    "ARTICLES",
    "AUTHORS_QUESTION",
    "SAMPLINGS",
    "AuditDataset",
    "AuditError",
    "AuditImage",
    "PlannedQuestion",
    "QuestionPlan",
    "load_coco",
    "load_objects_dataset",
    "plan_questions",
    "question_text",
]
