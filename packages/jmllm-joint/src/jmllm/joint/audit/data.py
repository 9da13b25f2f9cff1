"""Datasets of the hallucination audit (DESIGN §1.4): its images with their annotated classes,
read from two sources.

An audit dataset is a list of images, each with the set of object classes annotated in it, and
the class vocabulary (:mod:`jmllm.joint.audit.dataset`). Two sources:

- a **COCO-format** annotation file (``instances_*.json``: ``images``, ``annotations``,
  ``categories``) and the folder of its images (:func:`load_coco`);
- a **datasets** dataset with an image column and an objects column holding each object's
  category (:func:`load_objects_dataset`), e.g. ``detection-datasets/coco`` saved locally.

For every image, :func:`plan_questions` chooses which classes J is asked about (the authors'
protocol or POPE's sampling, :mod:`jmllm.joint.audit.questions`). This module still exports the
dataset types and the question plans.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.align.files import read_json, resolve_inside
from jmllm.align.options import clip
from jmllm.joint.audit.dataset import (
    AuditDataset,
    AuditError,
    AuditImage,
    _file_fingerprint,  # noqa: F401
    _pixels_fingerprint,
)
from jmllm.joint.audit.questions import (
    ARTICLES,
    AUTHORS_QUESTION,
    SAMPLINGS,
    PlannedQuestion,
    QuestionPlan,
    Sampling,  # noqa: F401
    plan_questions,
    question_text,
)

# ---------------------------------------------------------------------------------------------
# COCO format
# ---------------------------------------------------------------------------------------------


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
    ``bbox`` is kept in :attr:`~jmllm.joint.audit.dataset.AuditImage.boxes` (a missing or malformed one is counted in
    ``skipped_boxes``; the class still counts as present).

    Args:
        annotations: the ``instances_*.json`` file (``images``, ``annotations``, ``categories``).
        images: the folder the images' ``file_name`` are relative to.
        limit: audit only the first ``limit`` images (file order).

    Returns:
        :class:`~jmllm.joint.audit.dataset.AuditDataset`; classes in category order.

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
        :class:`~jmllm.joint.audit.dataset.AuditDataset`; classes from the ``ClassLabel`` names, else the names seen.

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
