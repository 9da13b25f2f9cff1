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
