"""MaxBoxAccV2 as clovaai/wsolevaluation computes it: thresholds, predicted boxes, IoU, the accumulator.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
PROTOCOLS = ("wsolevaluation", "exact")


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
