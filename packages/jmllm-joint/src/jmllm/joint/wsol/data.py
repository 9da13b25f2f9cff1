"""The WSOL data folder: its ``boxes.csv`` and images read, and ``boxes.csv`` written for CUB-200-2011.

Dataset layout (CUB-200-2011 style), ``DATA_DIR``:

    DATA_DIR/images/<image_id>           # e.g. 001.Black_footed_Albatross/Black_..._0046_18.jpg
    DATA_DIR/boxes.csv                   # header ``image_id,x0,y0,x1,y1``; one row per box,
                                         # several rows for an image with several objects;
                                         # an optional 6th column ``label``: the object word
                                         # explained in that image (default ``bird``)

:func:`cub_to_boxes_csv` writes ``boxes.csv`` for the 5,794 test images of an unpacked
CUB-200-2011 (``images.txt``, ``bounding_boxes.txt`` ``x y w h``, ``train_test_split.txt``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jmllm.align.files import atomic_write_text, resolve_inside


class WsolDataError(ValueError):
    """The WSOL folder or its boxes file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class WsolItem:
    """One image of a WSOL folder, its ground-truth boxes (G, 4) inclusive pixels and, when
    ``boxes.csv`` has a ``label`` column, the object word explained in it."""

    image_id: str
    path: Path
    boxes: np.ndarray
    label: str | None = None


BOXES_HEADER = ["image_id", "x0", "y0", "x1", "y1"]


def read_wsol_folder(data_dir: str | os.PathLike[str]) -> list[WsolItem]:
    """Read ``DATA_DIR/boxes.csv`` (``image_id,x0,y0,x1,y1``, optionally ``,label``) and locate
    ``DATA_DIR/images/``.

    Raises:
        WsolDataError: missing folder/file, bad header, or a malformed row (file and line named),
            an empty label, or an image labelled differently on two rows.
    """
    root = Path(data_dir)
    boxes_file, images = root / "boxes.csv", root / "images"
    if not root.is_dir():
        raise WsolDataError(f"{root}: no such folder")
    if not boxes_file.is_file():
        raise WsolDataError(f"{boxes_file}: missing (expected header image_id,x0,y0,x1,y1)")
    if not images.is_dir():
        raise WsolDataError(f"{images}: missing images folder")
    grouped: dict[str, list[list[float]]] = {}
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    with boxes_file.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if header not in (BOXES_HEADER, [*BOXES_HEADER, "label"]):
            raise WsolDataError(
                f"{boxes_file}:1: header must be image_id,x0,y0,x1,y1 (optionally ,label), got "
                f"{','.join(header)[:200]}"
            )
        fields = len(header)
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != fields:
                raise WsolDataError(
                    f"{boxes_file}:{line}: expected {fields} fields, got {len(row)}"
                )
            if fields == 6:
                label = row[5].strip()
                if not label or len(label.split()) != 1:
                    raise WsolDataError(
                        f"{boxes_file}:{line}: label must be one word, got {label[:100]!r}"
                    )
                if labels.setdefault(row[0].strip(), label) != label:
                    raise WsolDataError(
                        f"{boxes_file}:{line}: {row[0].strip()[:100]!r} is labelled "
                        f"{labels[row[0].strip()]!r} on an earlier row"
                    )
                row = row[:5]
            try:
                x0, y0, x1, y1 = (float(v) for v in row[1:])
            except ValueError:
                raise WsolDataError(f"{boxes_file}:{line}: coordinates must be numbers") from None
            if not (x1 >= x0 >= 0 and y1 >= y0 >= 0):
                raise WsolDataError(f"{boxes_file}:{line}: need 0 <= x0 <= x1 and 0 <= y0 <= y1")
            image_id = row[0].strip()
            if image_id not in grouped:
                try:  # never a file outside images/ (no "..", absolute path or link out)
                    paths[image_id] = resolve_inside(images, image_id, f"{boxes_file}:{line}")
                except ValueError as exc:
                    raise WsolDataError(str(exc)) from None
            grouped.setdefault(image_id, []).append([x0, y0, x1, y1])
    if not grouped:
        raise WsolDataError(f"{boxes_file}: no boxes")
    return [
        WsolItem(image_id, paths[image_id], np.array(b, dtype=np.float64), labels.get(image_id))
        for image_id, b in grouped.items()
    ]


def cub_to_boxes_csv(cub_root: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write ``boxes.csv`` for CUB-200-2011's test split (``is_training_image == 0``).

    CUB's ``bounding_boxes.txt`` holds ``x y w h``; rows become ``x0=x, y0=y, x1=x+w, y1=y+h``
    (as ``wsolevaluation`` converts them). Link or copy CUB's ``images/`` folder beside the file.

    Returns:
        the number of test images written.
    """
    root = Path(cub_root)
    names = dict(line.split() for line in (root / "images.txt").read_text().splitlines() if line)
    split = dict(
        line.split() for line in (root / "train_test_split.txt").read_text().splitlines() if line
    )
    rows = []
    for line in (root / "bounding_boxes.txt").read_text().splitlines():
        if not line.strip():
            continue
        image, x, y, w, h = line.split()
        if split.get(image) == "0":
            x0, y0 = float(x), float(y)
            rows.append([names[image], x0, y0, x0 + float(w), y0 + float(h)])
    _write_atomic(
        Path(out),
        "image_id,x0,y0,x1,y1\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows),
    )
    return len(rows)


def _write_atomic(path: Path, text: str) -> None:
    # fsynced, ordinary permissions, temporary file removed on error (docs/conventions.md)
    atomic_write_text(path, text)
