"""Weakly supervised object localisation (WSOL) check of GA maps with MaxBoxAccV2 (DESIGN §1.8).

MaxBoxAccV2 is Choe et al., *Evaluating Weakly Supervised Object Localization Methods Right*
(CVPR 2020): for each threshold τ (0, 0.01, …, 0.99) a box is drawn around every contour of the
map above τ; at IoU threshold δ an image is correct at τ if **any** predicted box has IoU ≥ δ with
**any** of its ground-truth boxes (inclusive pixel corners, the ``+1`` area convention);
BoxAcc(δ, τ) is the percentage of correct images, the best τ is taken per δ ∈ {0.3, 0.5, 0.7}
over the whole dataset, and MaxBoxAccV2 is the mean over δ.

Two protocols, by name (``docs/fidelity.md``):

``wsolevaluation`` (default)
    What clovaai/wsolevaluation's ``BoxEvaluator`` computes with ``multi_contour_eval`` and
    ``multi_iou_eval`` — the code every published WSOL number comes from, and which the paper's
    authors ran. It differs from the paper's description in four places, all reproduced: the
    map is **not** re-normalised (it must already lie in [0, 1]; a map whose minimum is above 0
    keeps it); an **8-bit copy** (``map × 255`` truncated) is thresholded at
    ``int(τ × its maximum)``, keeping pixels strictly above; contours are OpenCV's ``RETR_TREE``,
    so every **hole** of a component gets a box too; and a box ends at ``x + w`` (one pixel past
    the contour, clipped to the last column/row). No contour gives the box ``[0, 0, 0, 0]``.
    Needs OpenCV, the reference's own contour routine: ``pip install 'jmllm-joint[wsol]'``.
``exact``
    The paper's description with exact geometry: min–max normalised map, pixels strictly above τ
    in float, a box around every 8-connected component (outer contours only), boxes ending at
    the component's last pixel. No OpenCV needed.

The runner (:func:`run_wsol`) also offers two pipelines: ``authors`` (default, the authors' CUB
script: maps painted at 224 × 224 px, ground-truth boxes resized to 224 px as wsolevaluation does,
``int(x · 224 / width)``) and ``original`` (maps and boxes at the image's own resolution).

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
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from jmllm.align.files import atomic_write_text, resolve_inside
from jmllm.align.preprocessing import PAPER_PREPROCESSING
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
# The paper's WSOL setting: prompt "What's in the image? ASSISTANT: The image shows a", token
# "bird", query "a photo of a bird". The part after ASSISTANT: is J's (teacher-forced) answer.
WSOL_QUESTION = "What's in the image?"
WSOL_ANSWER = "The image shows a bird"
WSOL_TARGET = "bird"
WSOL_QUERY = "bird"  # with J's template "a photo of a {}"
METHODS = ("ga", "gradient")
PROTOCOLS = ("wsolevaluation", "exact")
PIPELINES = ("authors", "original")
AUTHORS_MAP_SIZE = 224  # wsolevaluation's _RESIZE_LENGTH; the authors paint their maps at it
PAGE_SAMPLES = 8  # images whose maps and boxes the HTML page shows
PAGE_PICTURE_SIDE = 512  # their pictures' longer side


class WsolDataError(ValueError):
    """The WSOL folder or its boxes file is malformed; the message names the file and line."""


class WsolDependencyError(ImportError):
    """The reference protocol needs OpenCV, which is not installed."""


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def opencv() -> Any:
    """The ``cv2`` module, or :class:`WsolDependencyError` saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise WsolDependencyError(
            "MaxBoxAccV2 with the reference protocol (wsolevaluation) needs OpenCV: "
            "pip install 'jmllm-joint[wsol]' (any OpenCV build works), or use protocol 'exact'"
        ) from None
    return cv2


def default_thresholds(step: float = 0.01) -> np.ndarray:
    """τ = 0, step, …, < 1 (``wsolevaluation``'s ``cam_curve_interval``)."""
    return np.arange(0.0, 1.0, step)


def normalise_map(saliency: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1]; a constant map becomes all zeros (never divides by zero)."""
    m = np.asarray(saliency, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"map: expected a non-empty (H, W) array, got shape {m.shape}")
    m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """Boxes ``x0, y0, x1, y1`` (inclusive pixels) around every 8-connected component: (K, 4)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros((0, 4), dtype=np.int64)
    slices = ndimage.find_objects(labels)
    return np.array(
        [[s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1] for s in slices if s is not None],
        dtype=np.int64,
    )


def check_reference_map(saliency: np.ndarray) -> np.ndarray:
    """The map as the reference accepts it: 2-D, finite, in [0, 1]; returned as float64 (the
    reference's dtype; float32 values convert exactly)."""
    m = np.asarray(saliency, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"map: expected a non-empty (H, W) array, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("map: contains NaN or infinite values (the reference refuses them)")
    lo, hi = float(m.min()), float(m.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"map: values must lie in [0, 1] for the reference protocol, got [{lo:g}, {hi:g}] "
            "(it does not re-normalise; min-max normalise first with normalise_map, or use "
            "protocol 'exact')"
        )
    return m


def reference_boxes(
    saliency: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> list[np.ndarray]:
    """Predicted boxes at every τ as clovaai/wsolevaluation's multi-contour ``BoxEvaluator``
    computes them (see the module docstring): one (K, 4) int array ``x0, y0, x1, y1`` per τ.

    Example:
        >>> m = np.zeros((8, 8)); m[2:5, 1:4] = 1.0
        >>> reference_boxes(m, [0.5])[0].tolist()  # ends one pixel past the blob
        [[1, 2, 4, 5]]
    """
    cv2 = opencv()
    m = check_reference_map(saliency)
    height, width = m.shape
    image = (m * 255).astype(np.uint8)  # the 8-bit copy the reference thresholds
    peak = image.max()
    out = []
    for tau in thresholds:
        _, binary = cv2.threshold(image, int(tau * peak), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if len(contours) == 0:
            out.append(np.zeros((1, 4), dtype=np.int64))
            continue
        rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64)  # x, y, w, h
        out.append(
            np.stack(
                [
                    rects[:, 0],
                    rects[:, 1],
                    np.minimum(rects[:, 0] + rects[:, 2], width - 1),
                    np.minimum(rects[:, 1] + rects[:, 3], height - 1),
                ],
                axis=1,
            )
        )
    return out


def resize_boxes(
    boxes: np.ndarray, image_size: tuple[int, int], size: tuple[int, int] = (224, 224)
) -> np.ndarray:
    """Ground-truth boxes resized as wsolevaluation's ``resize_bbox`` does: every coordinate
    ``x · new_width / width`` in float64, truncated with ``int()``.

    Example:
        >>> resize_boxes(np.array([[60, 27, 385, 331]]), (500, 335)).tolist()
        [[26, 18, 172, 221]]
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width, height = (float(v) for v in image_size)
    new_width, new_height = (float(v) for v in size)
    scaled = np.stack(
        [
            b[:, 0] * new_width / width,
            b[:, 1] * new_height / height,
            b[:, 2] * new_width / width,
            b[:, 3] * new_height / height,
        ],
        axis=1,
    )
    return np.trunc(scaled).astype(np.int64)


def box_iou_inclusive(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU (P, G) of inclusive-pixel boxes with the ``+1`` convention of ``wsolevaluation``."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(pred[:, None, 0], gt[None, :, 0])
    y0 = np.maximum(pred[:, None, 1], gt[None, :, 1])
    x1 = np.minimum(pred[:, None, 2], gt[None, :, 2])
    y1 = np.minimum(pred[:, None, 3], gt[None, :, 3])
    inter = np.clip(x1 - x0 + 1, 0, None) * np.clip(y1 - y0 + 1, 0, None)
    area_p = (pred[:, 2] - pred[:, 0] + 1) * (pred[:, 3] - pred[:, 1] + 1)
    area_g = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    union = area_p[:, None] + area_g[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class BoxAccuracy:
    """MaxBoxAccV2 of a set of maps.

    Attributes:
        value: MaxBoxAccV2 in percent (mean over δ of the best accuracy over τ).
        per_iou: δ → best BoxAcc (percent).
        best_threshold: δ → the τ that gives it.
        curve: δ → BoxAcc (percent) at every τ.
        thresholds: the τ grid.
        num_images: images scored.
        protocol: ``wsolevaluation`` or ``exact``.
    """

    value: float
    per_iou: dict[float, float]
    best_threshold: dict[float, float]
    curve: dict[float, list[float]]
    thresholds: list[float]
    num_images: int
    protocol: str = "wsolevaluation"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("per_iou", "best_threshold", "curve"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d


class BoxAccumulator:
    """Streams images into MaxBoxAccV2 so a dataset's maps are never all held in memory.

    Args:
        thresholds: τ grid (default 0, 0.01, …, 0.99).
        iou_thresholds: δ values (default 0.3, 0.5, 0.7).
        protocol: ``"wsolevaluation"`` (default, the reference code's numbers; needs OpenCV) or
            ``"exact"`` (see the module docstring).

    Example:
        >>> acc = BoxAccumulator(protocol="exact")
        >>> m = np.zeros((10, 10)); m[2:5, 3:8] = 1
        >>> acc.add(m, np.array([[3, 2, 7, 4]]))
        >>> acc.result().value
        100.0
    """

    def __init__(
        self,
        thresholds: Sequence[float] | np.ndarray | None = None,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
        protocol: str = "wsolevaluation",
    ) -> None:
        self.protocol = _check_choice("protocol", protocol, PROTOCOLS)
        if protocol == "wsolevaluation":
            opencv()  # fail now, not after the first model call
        self.thresholds = np.asarray(
            default_thresholds() if thresholds is None else thresholds, dtype=np.float64
        )
        if self.thresholds.ndim != 1 or self.thresholds.size == 0:
            raise ValueError("thresholds: expected a non-empty 1-D sequence")
        self.iou_thresholds = tuple(float(d) for d in iou_thresholds)
        if not self.iou_thresholds or not all(0 < d <= 1 for d in self.iou_thresholds):
            raise ValueError(f"iou_thresholds: each must be in (0, 1], got {iou_thresholds}")
        self.correct = np.zeros((len(self.iou_thresholds), self.thresholds.size), dtype=np.int64)
        self.count = 0

    def best_ious(self, saliency: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
        """Best IoU over (predicted boxes, GT boxes) at every τ: (len(thresholds),)."""
        gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        if gt.shape[0] == 0:
            raise ValueError("gt_boxes: an image needs at least one ground-truth box")
        best = np.zeros(self.thresholds.size)
        if self.protocol == "wsolevaluation":
            per_tau = reference_boxes(saliency, self.thresholds)
            ious = box_iou_inclusive(np.concatenate(per_tau), gt).max(axis=1)  # (sum K,)
            starts = np.cumsum([0] + [len(b) for b in per_tau[:-1]])
            return np.maximum.reduceat(ious, starts)
        m = normalise_map(saliency)
        for i, tau in enumerate(self.thresholds):
            boxes = component_boxes(m > tau)
            if boxes.shape[0]:
                best[i] = box_iou_inclusive(boxes, gt).max()
        return best

    def best_boxes(
        self, saliency: np.ndarray, gt_boxes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """At every τ, the predicted box with the best IoU against any ground-truth box, and that
        IoU: (len(thresholds),) IoUs (the same as :meth:`best_ious`) and (len(thresholds), 4)
        int boxes ``x0, y0, x1, y1``. A τ with no box gives ``[0, 0, 0, 0]`` and IoU 0 (the
        reference's own empty box under ``wsolevaluation``)."""
        gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        if gt.shape[0] == 0:
            raise ValueError("gt_boxes: an image needs at least one ground-truth box")
        if self.protocol == "wsolevaluation":
            per_tau = reference_boxes(saliency, self.thresholds)
        else:
            m = normalise_map(saliency)
            per_tau = [component_boxes(m > tau) for tau in self.thresholds]
        boxes = np.zeros((self.thresholds.size, 4), dtype=np.int64)
        ious = np.zeros(self.thresholds.size)
        for i, predicted in enumerate(per_tau):
            if len(predicted):
                best = box_iou_inclusive(predicted, gt).max(axis=1)  # (K,)
                k = int(best.argmax())
                boxes[i], ious[i] = predicted[k], best[k]
        return ious, boxes

    def add(self, saliency: np.ndarray, gt_boxes: np.ndarray) -> None:
        """Score one image's map against its (G, 4) ground-truth boxes."""
        best = self.best_ious(saliency, gt_boxes)
        for j, delta in enumerate(self.iou_thresholds):
            self.correct[j] += best >= delta
        self.count += 1

    def result(self) -> BoxAccuracy:
        if self.count == 0:
            raise ValueError("MaxBoxAccV2: no images were scored")
        acc = self.correct * 100.0 / self.count  # (len(δ), len(τ))
        best = acc.argmax(axis=1)
        per_iou = {d: float(acc[j, best[j]]) for j, d in enumerate(self.iou_thresholds)}
        return BoxAccuracy(
            value=float(np.mean(list(per_iou.values()))),
            per_iou=per_iou,
            best_threshold={
                d: float(self.thresholds[best[j]]) for j, d in enumerate(self.iou_thresholds)
            },
            curve={d: acc[j].tolist() for j, d in enumerate(self.iou_thresholds)},
            thresholds=self.thresholds.tolist(),
            num_images=self.count,
            protocol=self.protocol,
        )


def max_box_acc_v2(
    maps: Iterable[np.ndarray],
    gt_boxes: Iterable[np.ndarray],
    thresholds: Sequence[float] | np.ndarray | None = None,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    protocol: str = "wsolevaluation",
) -> BoxAccuracy:
    """MaxBoxAccV2 (Choe et al., CVPR 2020) of saliency maps against ground-truth boxes.

    Args:
        maps: one (H, W) map per image. ``wsolevaluation`` (default): values in [0, 1], scored
            as given (not re-normalised); ``exact``: any range, min–max normalised here.
        gt_boxes: one (G, 4) array per image of inclusive pixel boxes ``x0, y0, x1, y1``
            (integers, as the reference reads them).
        thresholds: τ grid (default 0, 0.01, …, 0.99: ``cam_curve_interval`` 0.01).
        iou_thresholds: δ values (default 0.3, 0.5, 0.7).
        protocol: ``"wsolevaluation"`` (clovaai/wsolevaluation's ``BoxEvaluator``, exactly;
            needs OpenCV) or ``"exact"`` (see the module docstring).

    Returns:
        :class:`BoxAccuracy`; ``.value`` is MaxBoxAccV2 in percent.

    Example:
        >>> m = np.zeros((8, 8)); m[1:4, 1:4] = 1
        >>> max_box_acc_v2([m], [np.array([[1, 1, 3, 3]])], protocol="exact").value
        100.0
        >>> max_box_acc_v2([m], [np.array([[1, 1, 3, 3]])]).per_iou[0.7]  # box ends at x + w
        0.0
    """
    acc = BoxAccumulator(thresholds, iou_thresholds, protocol)
    maps, gt_boxes = list(maps), list(gt_boxes)
    if len(maps) != len(gt_boxes):
        raise ValueError(f"maps: {len(maps)} maps for {len(gt_boxes)} ground-truth box sets")
    for i, (saliency, gt) in enumerate(zip(maps, gt_boxes, strict=True)):
        try:
            acc.add(saliency, gt)
        except ValueError as exc:
            raise ValueError(f"map {i}: {str(exc).removeprefix('map: ')}") from None
    return acc.result()


# ---------------------------------------------------------------------------------- dataset


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


# ---------------------------------------------------------------------------------- runner


@dataclass
class WsolSample:
    """One image kept for the WSOL page: its picture, maps and boxes, and the best box at every τ.

    Attributes:
        image_id: the image's id in ``boxes.csv``.
        picture: the image as scored (squashed to the map size under the authors' pipeline), at
            its drawing size.
        map_size: (width, height) of the scored maps; gt_boxes: (G, 4) ground truth in its pixels.
        maps: method → the map resized to the picture (for drawing only).
        best: method → (IoUs (T,), boxes (T, 4)) of :meth:`BoxAccumulator.best_boxes`.
    """

    image_id: str
    picture: Any
    map_size: tuple[int, int]
    gt_boxes: np.ndarray
    maps: dict[str, np.ndarray]
    best: dict[str, tuple[np.ndarray, np.ndarray]]

    def at(self, method: str, tau_index: int) -> tuple[list[int], float]:
        """The best predicted box (map pixels) and its IoU at threshold index ``tau_index``."""
        ious, boxes = self.best[method]
        return [int(v) for v in boxes[tau_index]], float(ious[tau_index])


@dataclass
class WsolReport:
    """MaxBoxAccV2 of GA beside the plain-gradient baseline on one WSOL folder.

    Attributes:
        results: method (``ga``, ``gradient``) → :class:`BoxAccuracy`.
        num_images: images scored; skipped: image id → reason (unreadable images, counted).
        seconds: wall time; setting: the prompt, token, query and weighting used.
    """

    results: dict[str, BoxAccuracy]
    num_images: int
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    setting: dict[str, Any] = field(default_factory=dict)
    samples: list[WsolSample] = field(default_factory=list)

    @property
    def sample_iou_threshold(self) -> float:
        """The IoU threshold δ whose best τ the page's sample boxes are drawn at: the middle
        one (0.5 by default)."""
        deltas = sorted(next(iter(self.results.values())).per_iou)
        return deltas[len(deltas) // 2]

    def sample_records(self) -> list[dict[str, Any]]:
        """Per sampled image and method: the best τ of :attr:`sample_iou_threshold`, the
        predicted box with the best IoU at it (map pixels) and that IoU."""
        delta = self.sample_iou_threshold
        records = []
        for sample in self.samples:
            record: dict[str, Any] = {
                "image_id": sample.image_id,
                "map_size": list(sample.map_size),
                "gt_boxes": sample.gt_boxes.astype(float).tolist(),
            }
            for method, result in self.results.items():
                if method not in sample.best:
                    continue
                tau = result.best_threshold[delta]
                box, iou = sample.at(method, result.thresholds.index(tau))
                record[method] = {"threshold": tau, "iou_threshold": delta, "box": box, "iou": iou}
            records.append(record)
        return records

    def to_json(self) -> dict[str, Any]:
        return {
            "max_box_acc_v2": {m: r.value for m, r in self.results.items()},
            "results": {m: r.to_json() for m, r in self.results.items()},
            "num_images": self.num_images,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "setting": self.setting,
            "samples": self.sample_records(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (atomically)."""
        _write_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    def save_page(
        self, path: str | os.PathLike[str], maps_dir: str | os.PathLike[str] | None = None
    ) -> Path:
        """Write the report's self-contained HTML page (:mod:`jmllm.joint.wsol.page`): the
        metric at each IoU threshold with its best threshold, the BoxAcc curves, and the sampled
        images' maps with their ground-truth and predicted boxes and IoUs.

        Args:
            path: the page (``.html``).
            maps_dir: also write every sample picture of the page there as a PNG
                (:func:`~jmllm.joint.wsol.page.map_file_name`), the folder made if needed.

        Returns:
            ``path``.

        Example:
            >>> report.save_page("cub.html", "cub_maps")  # doctest: +SKIP
            PosixPath('cub.html')
        """
        from jmllm.joint.render.report import atomic_write_bytes
        from jmllm.joint.wsol.page import wsol_page_parts

        page, pictures = wsol_page_parts(self)
        if maps_dir is not None:
            folder = Path(maps_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for name, png in pictures.items():
                atomic_write_bytes(folder / name, png)
        _write_atomic(Path(path), page)
        return Path(path)


def run_wsol(
    model: Any,
    data_dir: str | os.PathLike[str],
    weighting: str = "class",
    limit: int | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    progress: bool = True,
    *,
    template: str = "paper",
    protocol: str = "wsolevaluation",
    pipeline: str = "authors",
    box_rounding: str = "truncate",
    class_query: str = "matching",
    samples: int = PAGE_SAMPLES,
    tokenization: str = PAPER_TOKENIZATION,
    preprocessing: str = PAPER_PREPROCESSING,
    target: str | None = None,
) -> WsolReport:
    """GA maps (and the plain-gradient baseline) for every image of a WSOL folder, scored.

    Each image is explained with the paper's setting: question ``What's in the image?`` in the
    authors' conversation template, J's answer teacher-forced to ``The image shows a bird``,
    token ``bird``, query ``a photo of a bird`` — or, for another object word (``target``, or
    the image's ``label`` in ``boxes.csv``), ``The image shows a <word>``, its tokens, and the
    query ``a photo of a <word>``. One GA computation yields both maps: the GA map of
    ``weighting`` and the baseline (per-patch ‖∂ logit / ∂ t‖ painted on its grid cell). Every
    default is the authors' protocol (``docs/fidelity.md``).

    Args:
        model: a ``JointModel``.
        data_dir: the folder (layout in the module docstring).
        weighting: GA map weighting (``class``, ``coord``, ``any``).
        limit: score only the first ``limit`` images.
        thresholds: τ grid (default 0..0.99 step 0.01).
        progress: show a tqdm bar.
        template: conversation template, ``"paper"`` (default, the authors' CUB script:
            ``<image>\\nUSER: What's in the image?\\nASSISTANT: The image shows a``) or
            ``"llava-1.5"``.
        protocol: MaxBoxAccV2 protocol, ``"wsolevaluation"`` (default) or ``"exact"``.
        pipeline: ``"authors"`` (default: maps painted at 224 × 224 px, ground-truth boxes
            resized to 224 px as wsolevaluation does) or ``"original"`` (both at the image's
            own resolution).
        box_rounding, class_query: GA painting (see :class:`GradientAlignment`).
        samples: how many images, spread evenly over the folder, keep their pictures, maps and
            best boxes for the HTML page (:meth:`WsolReport.save_page`); 0 keeps none.
        tokenization: ``"legacy"`` (default: the authors' token ids) or ``"checkpoint"``
            (:mod:`jmllm.joint.chat.tokenization`).
        preprocessing: ``"authors"`` (default: the stored pixels, the HF processors' resize)
            or ``"exif"`` (:mod:`jmllm.align.preprocessing`).
        target: the object word (one word) explained in every image (default: each image's
            ``label`` from ``boxes.csv``, else the paper's ``bird``).

    Returns:
        :class:`WsolReport`. Unreadable images are skipped and listed, never silently dropped.

    Example:
        >>> report = run_wsol(model, "CUB_test/")  # doctest: +SKIP
        >>> report.to_json()["max_box_acc_v2"]  # doctest: +SKIP
        {'ga': 61.2, 'gradient': 48.3}
    """
    from jmllm.joint.chat.templates import get_template
    from jmllm.joint.model.joint import JointModelError
    from jmllm.joint.saliency import WEIGHTINGS, GradientAlignment

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    template = get_template(template).name
    inputs = model.input_record(template, tokenization, preprocessing)  # names checked here
    _check_choice("pipeline", pipeline, PIPELINES)
    accumulators = {m: BoxAccumulator(thresholds, protocol=protocol) for m in METHODS}
    ga = GradientAlignment(model, box_rounding=box_rounding, class_query=class_query)
    items = read_wsol_folder(data_dir)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        items = items[:limit]
    if samples < 0:
        raise ValueError(f"samples: must be >= 0, got {samples}")
    skipped: dict[str, str] = {}
    kept: list[WsolSample] = []
    # the page's sample: spread evenly over the folder, so it is not only its first class
    chosen = set(np.linspace(0, len(items) - 1, min(samples, len(items))).round().astype(int))
    start = time.perf_counter()
    iterator: Iterable[WsolItem] = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="WSOL", unit="image")
    size = (AUTHORS_MAP_SIZE, AUTHORS_MAP_SIZE) if pipeline == "authors" else None
    for index, item in enumerate(iterator):
        try:
            source = model.embed(item.path, preprocessing=preprocessing)
            word = target or item.label or WSOL_TARGET
            result = ga.attribute(
                source,
                WSOL_QUESTION,
                word,
                [word],
                answer=WSOL_ANSWER.replace(WSOL_TARGET, word),
                template=template,
                tokenization=tokenization,
            )
        except JointModelError as exc:
            skipped[item.image_id] = str(exc)
            logger.warning("skipping %s: %s", item.image_id, exc)
            continue
        gt = item.boxes
        if size is not None:
            gt = resize_boxes(item.boxes, result.image_size, size)
        maps = {
            "ga": result.map(weighting, size=size),
            "gradient": result.map("gradient", size=size),
        }
        for method, saliency in maps.items():
            accumulators[method].add(saliency, gt)
        if index in chosen:
            kept.append(_sample(item.image_id, source, maps, gt, accumulators))
    if not accumulators["ga"].count:
        raise WsolDataError(f"{data_dir}: no image could be scored ({len(skipped)} skipped)")
    return WsolReport(
        results={m: a.result() for m, a in accumulators.items()},
        num_images=accumulators["ga"].count,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        samples=kept,
        setting={
            "question": WSOL_QUESTION,
            **_wsol_words(target, items),
            "weighting": weighting,
            **inputs,  # template, tokenization, preprocessing, dtype
            "protocol": protocol,
            "pipeline": pipeline,
            "map_size": list(size) if size is not None else "original",
            "box_rounding": box_rounding,
            "class_query": class_query,
        },
    )


def _wsol_words(target: str | None, items: Sequence[WsolItem]) -> dict[str, str]:
    """The report's ``answer``, ``target`` and ``query`` settings: the explained word's."""
    words = {target or item.label or WSOL_TARGET for item in items}
    if len(words) == 1:
        (word,) = words
        return {"answer": WSOL_ANSWER.replace(WSOL_TARGET, word), "target": word, "query": word}
    return {
        "answer": WSOL_ANSWER.replace(WSOL_TARGET, "<label>"),
        "target": "each image's label (boxes.csv)",
        "query": "each image's label",
    }


def _sample(
    image_id: str,
    emb: Any,
    maps: dict[str, np.ndarray],
    gt: np.ndarray,
    accumulators: dict[str, BoxAccumulator],
) -> WsolSample:
    """A :class:`WsolSample`: the picture as scored, the maps at its size, the best boxes."""
    from PIL import Image

    from jmllm.joint.render.drawing import fit_picture, picture_size

    height, width = next(iter(maps.values())).shape
    shown = picture_size((width, height), max_side=PAGE_PICTURE_SIDE, min_side=PAGE_PICTURE_SIDE)
    picture = fit_picture(emb.pil_image(0), shown=shown)  # squashed like the maps, if they are
    small = {
        m: np.asarray(
            Image.fromarray(np.asarray(v, dtype=np.float32), "F").resize(
                shown, Image.Resampling.BILINEAR
            )
        )
        for m, v in maps.items()
    }
    best = {m: accumulators[m].best_boxes(v, gt) for m, v in maps.items()}
    gt_boxes = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    return WsolSample(image_id, picture, (width, height), gt_boxes, small, best)


__all__ = [
    "AUTHORS_MAP_SIZE",
    "IOU_THRESHOLDS",
    "PIPELINES",
    "PROTOCOLS",
    "BoxAccumulator",
    "BoxAccuracy",
    "WsolDataError",
    "WsolDependencyError",
    "WsolItem",
    "WsolReport",
    "WsolSample",
    "box_iou_inclusive",
    "check_reference_map",
    "component_boxes",
    "cub_to_boxes_csv",
    "default_thresholds",
    "max_box_acc_v2",
    "normalise_map",
    "opencv",
    "read_wsol_folder",
    "reference_boxes",
    "resize_boxes",
    "run_wsol",
]
