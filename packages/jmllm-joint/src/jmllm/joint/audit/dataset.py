"""The hallucination audit's images and datasets: :class:`AuditImage` (an image, its annotated
classes and boxes, its fingerprint), :class:`AuditDataset` and :class:`AuditError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


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


__all__ = [
    "AuditDataset",
    "AuditError",
    "AuditImage",
]
