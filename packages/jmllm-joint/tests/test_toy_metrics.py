"""AP, caption and QA metrics of the toy world, on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jmllm.joint.toy.metrics import (
    average_precision,
    caption_accuracy,
    iou_matrix,
    qa_accuracy,
)
from jmllm.joint.toy.scenes import ToyObject

BOX = np.array([[0, 0, 10, 10]], dtype=float)
FAR = np.array([[50, 50, 60, 60]], dtype=float)


def _pred(*pairs):
    boxes = np.array([b for b, _ in pairs], dtype=float).reshape(-1, 4)
    return boxes, np.array([s for _, s in pairs], dtype=float)


def test_iou_is_scale_free_and_exclusive_ends():
    assert iou_matrix(BOX, BOX)[0, 0] == 1.0
    assert iou_matrix(BOX, np.array([[0, 0, 10, 20]]))[0, 0] == pytest.approx(0.5)
    assert iou_matrix(BOX, np.array([[10, 0, 20, 10]]))[0, 0] == 0.0  # touching, not overlapping


def test_perfect_and_ranked_cases():
    assert average_precision([_pred((BOX[0], 0.9))], [BOX]) == 1.0
    # ranked: TP (0.9), FP (0.8), TP (0.7) over two objects:
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 · 1 + 1/2 · 2/3 = 5/6
    preds = [_pred((BOX[0], 0.9)), _pred((FAR[0], 0.8), (BOX[0], 0.7))]
    assert average_precision(preds, [BOX, BOX]) == pytest.approx(5 / 6)
    # a false positive ranked below every true positive costs nothing
    preds = [_pred((BOX[0], 0.9), (FAR[0], 0.1)), _pred((BOX[0], 0.8))]
    assert average_precision(preds, [BOX, BOX]) == 1.0
    # ... ranked first: FP, TP, TP gives precision 0, 1/2, 2/3 at recall 0, 1/2, 1; made
    # monotone from the right, both recall steps count at 2/3
    preds = [_pred((BOX[0], 0.5), (FAR[0], 0.9)), _pred((BOX[0], 0.8))]
    assert average_precision(preds, [BOX, BOX]) == pytest.approx(2 / 3)


def test_duplicates_misses_images_without_objects_and_the_iou_threshold():
    # a second detection of the same object is a false positive
    dup = [_pred((BOX[0], 0.9), (BOX[0], 0.8)), _pred((BOX[0], 0.7))]
    assert average_precision(dup, [BOX, BOX]) == pytest.approx((1 + 2 / 3) / 2)
    # an object never detected caps recall: AP = 1/2
    assert average_precision([_pred((BOX[0], 0.9)), _pred()], [BOX, BOX]) == 0.5
    # an image without objects of the class still contributes its false positives
    preds = [_pred((BOX[0], 0.5)), _pred((FAR[0], 0.9))]
    assert average_precision(preds, [BOX, np.zeros((0, 4))]) == 0.5
    # IoU exactly at the threshold counts, just below does not
    half = np.array([[0, 0, 10, 20]], dtype=float)
    assert average_precision([_pred((half[0], 0.9))], [BOX], 0.5) == 1.0
    assert average_precision([_pred((half[0], 0.9))], [BOX], 0.51) == 0.0
    assert math.isnan(average_precision([_pred((BOX[0], 0.9))], [np.zeros((0, 4))]))
    with pytest.raises(ValueError, match="images"):
        average_precision([_pred()], [BOX, BOX])


def test_caption_and_qa_accuracy():
    red_circle = ToyObject("circle", "red", (0, 0, 5, 5))
    blue_square = ToyObject("square", "blue", (9, 0, 14, 5))
    scenes = [[red_circle], [red_circle, blue_square], [red_circle, blue_square]]
    answers = [
        "a red circle",  # right
        "The image shows a blue square and a red circle.",  # right, any order
        "a red circle and a blue circle",  # wrong colour for the second object
    ]
    assert caption_accuracy(answers, scenes) == pytest.approx(2 / 3)
    assert caption_accuracy(["a red circle and a red circle"], [[red_circle]]) == 0.0
    assert qa_accuracy(["Yes.", " two", "Red", "no"], ["yes", "two", "red", "yes"]) == 0.75
    with pytest.raises(ValueError):
        qa_accuracy([], [])


def test_docstring_examples():
    import doctest

    import jmllm.joint.toy.metrics as module

    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def _brute_force_ap(predictions, truths, threshold):
    """AP from first principles: for every cut-off k, match the k best-scored predictions
    afresh (greedy in score order, each ground-truth box once, within its image), then
    integrate the interpolated precision p(r) = max{precision_k : recall_k ≥ r} over recall,
    exactly, at the midpoint of each 1/G recall step."""
    flat = [
        (s, i, b)
        for i, (boxes, scores) in enumerate(predictions)
        for b, s in zip(boxes, scores, strict=True)
    ]
    flat.sort(key=lambda f: -f[0])
    total = sum(len(t) for t in truths)
    points = []
    for k in range(1, len(flat) + 1):
        taken = set()
        tp = 0
        for _, i, box in flat[:k]:
            best, best_j = -1.0, None
            for j, gt in enumerate(truths[i]):
                if (i, j) in taken:
                    continue
                ix = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
                iy = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
                union = (
                    (box[2] - box[0]) * (box[3] - box[1])
                    + (gt[2] - gt[0]) * (gt[3] - gt[1])
                    - ix * iy
                )
                iou = ix * iy / union
                if iou > best:
                    best, best_j = iou, j
            if best_j is not None and best >= threshold:
                taken.add((i, best_j))
                tp += 1
        points.append((tp / total, tp / k))
    area = 0.0
    for step in range(total):
        r = (step + 0.5) / total
        area += max([p for rec, p in points if rec >= r], default=0.0) / total
    return area


@pytest.mark.parametrize("seed", range(12))
def test_average_precision_equals_a_brute_force_definition(seed):
    rng = np.random.default_rng(seed)
    predictions, truths = [], []
    for _ in range(int(rng.integers(1, 6))):
        gt = rng.uniform(0, 80, (int(rng.integers(0, 4)), 2))
        gt = np.concatenate([gt, gt + rng.uniform(8, 30, gt.shape)], axis=1)
        boxes = []
        for g in gt:  # noisy copies of the truth (some duplicates, some poor) ...
            for _ in range(int(rng.integers(0, 3))):
                boxes.append(g + rng.normal(0, 4, 4))
        for _ in range(int(rng.integers(0, 3))):  # ... and boxes anywhere
            xy = rng.uniform(0, 80, 2)
            boxes.append(np.concatenate([xy, xy + rng.uniform(8, 30, 2)]))
        boxes_arr = np.array(boxes, dtype=float).reshape(-1, 4)
        boxes_arr[:, 2:] = np.maximum(boxes_arr[:, 2:], boxes_arr[:, :2] + 1)
        predictions.append((boxes_arr, rng.permutation(1000)[: len(boxes_arr)] / 1000))
        truths.append(gt)
    if sum(len(t) for t in truths) == 0:
        truths[0] = np.array([[0.0, 0.0, 10.0, 10.0]])
    for threshold in (0.3, 0.5, 0.7):
        want = _brute_force_ap(predictions, truths, threshold)
        assert average_precision(predictions, truths, threshold) == pytest.approx(want, abs=1e-12)
