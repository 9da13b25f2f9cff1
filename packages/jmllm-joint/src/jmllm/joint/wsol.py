"""Weakly supervised object localisation (WSOL) check of GA maps with MaxBoxAccV2 (DESIGN §1.8).

MaxBoxAccV2 follows Choe et al., *Evaluating Weakly Supervised Object Localization Methods Right*
(CVPR 2020) and their ``wsolevaluation`` code:

- every map is min–max normalised to [0, 1];
- for each threshold τ (default 0, 0.01, …, 0.99) the pixels **strictly above** τ are split into
  8-connected components (``scipy.ndimage.label``; the outer contours OpenCV would trace) and a
  box is drawn around **every** component;
- at IoU threshold δ an image is correct at τ if **any** predicted box has IoU ≥ δ with **any**
  of its ground-truth boxes (boxes are inclusive pixel corners; IoU uses the ``+1`` pixel
  convention of ``wsolevaluation``);
- BoxAcc(δ, τ) is the percentage of correct images; for each δ ∈ {0.3, 0.5, 0.7} the best τ is
  taken over the whole dataset, and MaxBoxAccV2 is the mean over δ of those best accuracies.

Maps are scored at the original image resolution with boxes in original pixels (``wsolevaluation``
resizes both to 224 px; IoU is scale-invariant up to pixel rounding).

Dataset layout (CUB-200-2011 style), ``DATA_DIR``:

    DATA_DIR/images/<image_id>           # e.g. 001.Black_footed_Albatross/Black_..._0046_18.jpg
    DATA_DIR/boxes.csv                   # header ``image_id,x0,y0,x1,y1``; one row per box,
                                         # several rows for an image with several objects

:func:`cub_to_boxes_csv` writes ``boxes.csv`` for the 5,794 test images of an unpacked
CUB-200-2011 (``images.txt``, ``bounding_boxes.txt`` ``x y w h``, ``train_test_split.txt``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
# The paper's WSOL setting: prompt "What's in the image? ASSISTANT: The image shows a", token
# "bird", query "a photo of a bird". The part after ASSISTANT: is J's (teacher-forced) answer.
WSOL_QUESTION = "What's in the image?"
WSOL_ANSWER = "The image shows a bird"
WSOL_TARGET = "bird"
WSOL_QUERY = "bird"  # with J's template "a photo of a {}"
METHODS = ("ga", "gradient")


class WsolDataError(ValueError):
    """The WSOL folder or its boxes file is malformed; the message names the file and line."""


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
    """

    value: float
    per_iou: dict[float, float]
    best_threshold: dict[float, float]
    curve: dict[float, list[float]]
    thresholds: list[float]
    num_images: int

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("per_iou", "best_threshold", "curve"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d


class BoxAccumulator:
    """Streams images into MaxBoxAccV2 so a dataset's maps are never all held in memory.

    Example:
        >>> acc = BoxAccumulator()
        >>> m = np.zeros((10, 10)); m[2:5, 3:8] = 1
        >>> acc.add(m, np.array([[3, 2, 7, 4]]))
        >>> acc.result().value
        100.0
    """

    def __init__(
        self,
        thresholds: Sequence[float] | np.ndarray | None = None,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    ) -> None:
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
        m = normalise_map(saliency)
        best = np.zeros(self.thresholds.size)
        for i, tau in enumerate(self.thresholds):
            boxes = component_boxes(m > tau)
            if boxes.shape[0]:
                best[i] = box_iou_inclusive(boxes, gt).max()
        return best

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
        )


def max_box_acc_v2(
    maps: Iterable[np.ndarray],
    gt_boxes: Iterable[np.ndarray],
    thresholds: Sequence[float] | np.ndarray | None = None,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> BoxAccuracy:
    """MaxBoxAccV2 (Choe et al., CVPR 2020) of saliency maps against ground-truth boxes.

    Args:
        maps: one (H, W) map per image (any range; min–max normalised here).
        gt_boxes: one (G, 4) array per image of inclusive pixel boxes ``x0, y0, x1, y1``.
        thresholds: τ grid over the normalised map (default 0, 0.01, …, 0.99).
        iou_thresholds: δ values (default 0.3, 0.5, 0.7).

    Returns:
        :class:`BoxAccuracy`; ``.value`` is MaxBoxAccV2 in percent.

    Example:
        >>> m = np.zeros((8, 8)); m[1:4, 1:4] = 1
        >>> max_box_acc_v2([m], [np.array([[1, 1, 3, 3]])]).value
        100.0
    """
    acc = BoxAccumulator(thresholds, iou_thresholds)
    maps, gt_boxes = list(maps), list(gt_boxes)
    if len(maps) != len(gt_boxes):
        raise ValueError(f"maps: {len(maps)} maps for {len(gt_boxes)} ground-truth box sets")
    for saliency, gt in zip(maps, gt_boxes, strict=True):
        acc.add(saliency, gt)
    return acc.result()


# ---------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class WsolItem:
    """One image of a WSOL folder and its ground-truth boxes (G, 4) inclusive pixels."""

    image_id: str
    path: Path
    boxes: np.ndarray


def read_wsol_folder(data_dir: str | os.PathLike[str]) -> list[WsolItem]:
    """Read ``DATA_DIR/boxes.csv`` (``image_id,x0,y0,x1,y1``) and locate ``DATA_DIR/images/``.

    Raises:
        WsolDataError: missing folder/file, bad header, or a malformed row (file and line named).
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
    with boxes_file.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if header != ["image_id", "x0", "y0", "x1", "y1"]:
            raise WsolDataError(
                f"{boxes_file}:1: header must be image_id,x0,y0,x1,y1, got {','.join(header)}"
            )
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 5:
                raise WsolDataError(f"{boxes_file}:{line}: expected 5 fields, got {len(row)}")
            try:
                x0, y0, x1, y1 = (float(v) for v in row[1:])
            except ValueError:
                raise WsolDataError(f"{boxes_file}:{line}: coordinates must be numbers") from None
            if not (x1 >= x0 >= 0 and y1 >= y0 >= 0):
                raise WsolDataError(f"{boxes_file}:{line}: need 0 <= x0 <= x1 and 0 <= y0 <= y1")
            grouped.setdefault(row[0].strip(), []).append([x0, y0, x1, y1])
    if not grouped:
        raise WsolDataError(f"{boxes_file}: no boxes")
    return [
        WsolItem(image_id, images / image_id, np.array(b, dtype=np.float64))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- runner


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

    def to_json(self) -> dict[str, Any]:
        return {
            "max_box_acc_v2": {m: r.value for m, r in self.results.items()},
            "results": {m: r.to_json() for m, r in self.results.items()},
            "num_images": self.num_images,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "setting": self.setting,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (atomically)."""
        _write_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)


def run_wsol(
    model: Any,
    data_dir: str | os.PathLike[str],
    weighting: str = "class",
    limit: int | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    progress: bool = True,
) -> WsolReport:
    """GA maps (and the plain-gradient baseline) for every image of a WSOL folder, scored.

    Each image is explained with the paper's setting: question ``What's in the image?``, J's
    answer teacher-forced to ``The image shows a bird``, token ``bird``, query
    ``a photo of a bird``. One GA computation yields both maps: the GA map of ``weighting``
    and the baseline (per-patch ‖∂ logit / ∂ t‖ painted on its grid cell).

    Args:
        model: a ``JointModel``.
        data_dir: the folder (layout in the module docstring).
        weighting: GA map weighting (``class``, ``coord``, ``any``).
        limit: score only the first ``limit`` images.
        thresholds: τ grid (default 0..0.99 step 0.01).
        progress: show a tqdm bar.

    Returns:
        :class:`WsolReport`. Unreadable images are skipped and listed, never silently dropped.

    Example:
        >>> report = run_wsol(model, "CUB_test/")  # doctest: +SKIP
        >>> report.to_json()["max_box_acc_v2"]  # doctest: +SKIP
        {'ga': 61.2, 'gradient': 48.3}
    """
    from jmllm.joint.model import JointModelError
    from jmllm.joint.saliency import WEIGHTINGS, GradientAlignment

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    items = read_wsol_folder(data_dir)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        items = items[:limit]
    ga = GradientAlignment(model)
    accumulators = {m: BoxAccumulator(thresholds) for m in METHODS}
    skipped: dict[str, str] = {}
    start = time.perf_counter()
    iterator: Iterable[WsolItem] = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="WSOL", unit="image")
    for item in iterator:
        try:
            result = ga.attribute(
                item.path, WSOL_QUESTION, WSOL_TARGET, [WSOL_QUERY], answer=WSOL_ANSWER
            )
        except JointModelError as exc:
            skipped[item.image_id] = str(exc)
            logger.warning("skipping %s: %s", item.image_id, exc)
            continue
        accumulators["ga"].add(result.maps[weighting], item.boxes)
        accumulators["gradient"].add(result.maps["gradient"], item.boxes)
    if not accumulators["ga"].count:
        raise WsolDataError(f"{data_dir}: no image could be scored ({len(skipped)} skipped)")
    return WsolReport(
        results={m: a.result() for m, a in accumulators.items()},
        num_images=accumulators["ga"].count,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        setting={
            "question": WSOL_QUESTION,
            "answer": WSOL_ANSWER,
            "target": WSOL_TARGET,
            "query": WSOL_QUERY,
            "weighting": weighting,
        },
    )


__all__ = [
    "IOU_THRESHOLDS",
    "BoxAccumulator",
    "BoxAccuracy",
    "WsolDataError",
    "WsolItem",
    "WsolReport",
    "box_iou_inclusive",
    "component_boxes",
    "cub_to_boxes_csv",
    "default_thresholds",
    "max_box_acc_v2",
    "normalise_map",
    "read_wsol_folder",
    "run_wsol",
]
