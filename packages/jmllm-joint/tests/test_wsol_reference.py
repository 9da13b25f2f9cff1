"""MaxBoxAccV2's default protocol against an independent implementation of clovaai/wsolevaluation.

``reference_max_box_acc_v2`` below is written from the reference's paper (Choe et al., CVPR 2020)
and its documented behaviour (``BoxEvaluator`` with ``multi_contour_eval`` and
``multi_iou_eval``, ``cam_curve_interval`` 0.01), with plain scipy labelling and Python loops
instead of OpenCV:

- the map is used as given, in [0, 1] (no re-normalisation);
- its 8-bit copy ``floor(255 · m)`` is kept where it is strictly above ``floor(τ · max)``;
- contours are those of ``RETR_TREE``: the outer border of every 8-connected component and the
  border of every hole (a 4-connected background region the component encloses), which runs
  along the component's pixels just outside the hole;
- a contour's box is its bounding rectangle ``(x, y, w, h)`` taken as ``x0 = x, x1 = x + w``
  (one pixel past the contour), clipped to the last column / row; no contour: ``[0, 0, 0, 0]``;
- IoU with the ``+1`` area convention, best over boxes and ground-truth boxes, correct if ≥ δ,
  best τ per δ over the dataset, mean over δ ∈ {0.3, 0.5, 0.7}.

The battery covers noise, smooth noise, painted boxes (GA-like), blobs, rings with holes and
islands in the holes, quantised maps, non-square images, maps with minimum above 0, empty and
near-empty maps, and float32 maps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from jmllm.joint.wsol import BoxAccumulator, max_box_acc_v2, resize_boxes

pytest.importorskip("cv2", reason="the reference protocol needs jmllm-joint[wsol]")

DELTAS = (0.3, 0.5, 0.7)
TAUS = np.arange(0, 1, 0.01)  # cam_curve_interval 0.01


def _iou_plus_one(a, b) -> float:
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, ix) * max(0, iy)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _contour_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding rectangles (inclusive) of every RETR_TREE contour of a binary mask."""
    rects = []
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    for rows, cols in ndimage.find_objects(labels):
        rects.append((cols.start, rows.start, cols.stop - 1, rows.stop - 1))
    framed = np.pad(~mask, 1, constant_values=True)  # the outside is background
    holes, _ = ndimage.label(framed)  # background regions, 4-connected
    for rows, cols in ndimage.find_objects(holes):
        touches = rows.start == 0 or cols.start == 0
        touches = touches or rows.stop == framed.shape[0] or cols.stop == framed.shape[1]
        if not touches:  # enclosed: its contour runs one pixel outside it (frame offset 1)
            rects.append((cols.start - 2, rows.start - 2, cols.stop - 1, rows.stop - 1))
    return rects


def reference_best_ious(scoremap: np.ndarray, gt_boxes) -> list[float]:
    height, width = scoremap.shape
    eight_bit = np.floor(np.asarray(scoremap, dtype=np.float64) * 255)
    peak = eight_bit.max()
    best = []
    for tau in TAUS:
        mask = eight_bit > math.floor(tau * peak)
        boxes = [
            (x0, y0, min(x1 + 1, width - 1), min(y1 + 1, height - 1))
            for x0, y0, x1, y1 in _contour_boxes(mask)
        ] or [(0, 0, 0, 0)]
        best.append(max(_iou_plus_one(p, g) for p in boxes for g in gt_boxes))
    return best


def reference_max_box_acc_v2(maps, gts) -> dict[float, float]:
    per_image = [reference_best_ious(m, g) for m, g in zip(maps, gts, strict=True)]
    result = {}
    for delta in DELTAS:
        accuracy = [
            100.0 * sum(ious[i] >= delta for ious in per_image) / len(per_image)
            for i in range(len(TAUS))
        ]
        result[delta] = max(accuracy)
    return result


def _battery(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []

    def gt_for(h, w, n=1):
        boxes = []
        for _ in range(n):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            boxes.append([x0, y0, int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))])
        return np.array(boxes)

    def unit(m):
        m = m - m.min()
        return m / m.max() if m.max() > 0 else m

    for h, w in ((40, 40), (37, 91), (64, 23)):
        out.append(("uniform noise", rng.random((h, w)), gt_for(h, w)))
        smooth = ndimage.gaussian_filter(rng.random((h, w)), 3)
        out.append(("smooth noise", unit(smooth), gt_for(h, w, 2)))
        painted = np.zeros((h, w))
        for weight in (*rng.random(12), 1.0):  # GA maps: boxes, pixel-wise maximum
            x0, y0 = rng.integers(0, w - 1), rng.integers(0, h - 1)
            x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
            painted[y0:y1, x0:x1] = np.maximum(painted[y0:y1, x0:x1], weight)
        out.append(("painted boxes", painted, gt_for(h, w)))
        yy, xx = np.mgrid[0:h, 0:w]
        blobs = sum(
            rng.random()
            * np.exp(-((xx - rng.random() * w) ** 2 + (yy - rng.random() * h) ** 2) / 30)
            for _ in range(4)
        )
        out.append(("blobs", unit(blobs), gt_for(h, w)))
        out.append(("quantised", np.round(unit(smooth) * 3) / 3, gt_for(h, w)))
        out.append(("quantised fine", np.round(unit(blobs) * 7) / 7, gt_for(h, w)))
        out.append(("minimum above 0", 0.35 + 0.65 * unit(smooth), gt_for(h, w)))
        out.append(("float32 noise", rng.random((h, w)).astype(np.float32), gt_for(h, w)))

    # rings and annuli with holes, islands inside the holes, rings touching the border
    yy, xx = np.mgrid[0:60, 0:80]
    r = np.hypot(xx - 40, yy - 30)
    rings = np.where((r > 18) & (r < 24), 1.0, 0.0) + np.where((r > 8) & (r < 11), 0.6, 0.0)
    rings[28:33, 38:43] = 0.9  # an island in the inner hole
    out.append(("nested rings", rings, np.array([[22, 12, 58, 48]])))
    out.append(("ring hole as target", rings, np.array([[23, 13, 57, 47]])))
    square_ring = np.zeros((30, 30))
    square_ring[0:20, 0:20] = 0.8
    square_ring[3:17, 3:17] = 0.0
    square_ring[8:12, 8:12] = 0.4
    out.append(("border ring", square_ring, np.array([[3, 3, 16, 16]])))
    diagonal = np.zeros((12, 12))  # a hole closed only diagonally (8-connected foreground)
    for i in range(2, 9):
        diagonal[2, i] = diagonal[8, i] = diagonal[i, 2] = diagonal[i, 8] = 1.0
    diagonal[2, 2] = diagonal[8, 8] = 0.0
    diagonal[3, 3] = diagonal[7, 7] = 1.0
    out.append(("diagonal hole", diagonal, np.array([[3, 3, 7, 7]])))
    out.append(("all zero", np.zeros((20, 30)), np.array([[0, 0, 4, 4]])))
    out.append(("below one 8-bit step", np.full((20, 30), 0.003), np.array([[0, 0, 4, 4]])))
    out.append(("constant 0.5", np.full((20, 30), 0.5), np.array([[0, 0, 29, 19]])))
    return out


BATTERY = _battery()


def test_battery_parity_per_image_and_threshold():
    for name, scoremap, gt in BATTERY:
        ours = BoxAccumulator().best_ious(scoremap, gt)
        expected = reference_best_ious(scoremap, gt.tolist())
        assert ours.tolist() == expected, name  # exactly, at every τ


def test_battery_parity_max_box_acc_v2():
    maps = [m for _, m, _ in BATTERY]
    gts = [g for _, _, g in BATTERY]
    result = max_box_acc_v2(maps, gts)
    assert result.per_iou == reference_max_box_acc_v2(maps, [g.tolist() for g in gts])
    assert result.value == pytest.approx(np.mean(list(result.per_iou.values())), abs=0)
    assert result.protocol == "wsolevaluation" and len(result.thresholds) == 100
    # the battery exercises the reference's quirks: the exact protocol scores it differently
    exact = max_box_acc_v2(maps, gts, protocol="exact")
    assert exact.per_iou != result.per_iou


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batteries(seed):
    battery = _battery(seed)
    maps, gts = [m for _, m, _ in battery], [g for _, _, g in battery]
    assert max_box_acc_v2(maps, gts).per_iou == reference_max_box_acc_v2(
        maps, [g.tolist() for g in gts]
    )


def test_each_quirk_on_its_own():
    acc = BoxAccumulator(thresholds=[0.5])
    exact = BoxAccumulator(thresholds=[0.5], protocol="exact")
    # boxes end at x + w: a 10 × 10 blob matching its box exactly scores 100/121
    m = np.zeros((30, 30))
    m[5:15, 5:15] = 1.0
    gt = np.array([[5, 5, 14, 14]])
    assert acc.best_ious(m, gt)[0] == pytest.approx(100 / 121)
    assert exact.best_ious(m, gt)[0] == 1.0
    # holes get boxes: the inside of a ring is found only through its hole's contour
    ring = np.zeros((30, 30))
    ring[2:28, 2:28] = 1.0
    ring[6:24, 6:24] = 0.0
    hole = np.array([[5, 5, 25, 25]])  # the hole's contour box, one wider at the right/bottom
    assert acc.best_ious(ring, hole)[0] == 1.0
    assert exact.best_ious(ring, hole)[0] < 0.7
    # no re-normalisation: a floor of 0.6 stays above τ = 0.5, the whole image is one box
    floor = np.full((30, 30), 0.6)
    floor[10:20, 10:20] = 1.0
    whole = np.array([[0, 0, 29, 29]])
    assert acc.best_ious(floor, whole)[0] == 1.0
    assert exact.best_ious(floor, whole)[0] < 0.2
    # the 8-bit copy: 0.5 and 0.501 are both 127, so no τ separates the right half
    near = np.full((10, 10), 0.5)
    near[:, 5:] = 0.501
    near[0, 0] = 1.0
    right = np.array([[5, 0, 9, 9]])
    assert BoxAccumulator().best_ious(near, right).max() == 0.5  # whole image or one pixel
    assert BoxAccumulator(thresholds=[0.001], protocol="exact").best_ious(near, right)[0] == 1.0


def test_ground_truth_resized_as_the_reference():
    # int(x * 224 / width) per coordinate, in float64
    boxes = np.array([[60, 27, 385, 331], [0, 0, 499, 334]])
    expected = [
        [int(x0 * 224.0 / 500), int(y0 * 224.0 / 335), int(x1 * 224.0 / 500), int(y1 * 224.0 / 335)]
        for x0, y0, x1, y1 in boxes.tolist()
    ]
    assert resize_boxes(boxes, (500, 335)).tolist() == expected
