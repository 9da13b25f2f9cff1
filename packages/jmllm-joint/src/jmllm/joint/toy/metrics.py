"""Scores of the toy models against the scenes' truth: detection AP, caption and QA accuracy.

- :func:`average_precision`: Pascal VOC / COCO-style AP of one class at one IoU threshold. All
  predictions of all images are ranked by score; each is a true positive when its best-overlapping
  *still unmatched* ground-truth box of its image has IoU ≥ the threshold (a second detection of
  an object is a false positive); AP is the area under the precision–recall curve with precision
  made monotone (every-point interpolation, as VOC 2010+ and COCO's per-threshold AP, without
  COCO's 101-point sampling). Images without any box of the class still contribute their false
  positives.
- :func:`caption_accuracy`: the fraction of answers whose mentioned (colour, shape) objects equal
  the scene's, as a multiset (:func:`jmllm.joint.toy.scenes.caption_correct`).
- :func:`qa_accuracy`: exact match of normalised short answers.

Example:
    >>> import numpy as np
    >>> truth = [np.array([[0, 0, 10, 10]])]
    >>> average_precision([(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.8]))], truth)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jmllm.joint.toy.scenes import ToyObject, caption_correct, normalise_answer


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (P, G) of continuous ``x0, y0, x1, y1`` boxes (``x1`` exclusive for pixel boxes)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    truths: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> float:
    """AP of one class over a set of images.

    Args:
        predictions: per image, ``(boxes (P, 4), scores (P,))`` predicted for the class.
        truths: per image, the class's ground-truth boxes (G, 4) (G may be 0).
        iou_threshold: a detection matches a ground-truth box at IoU ≥ this.

    Returns:
        AP in [0, 1]; NaN when no image has a box of the class (AP is undefined).

    Example:
        >>> truth = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]])]
        >>> preds = [(np.array([[0, 0, 10, 10]]), np.array([0.9])),
        ...          (np.array([[30, 30, 40, 40], [0, 0, 10, 10]]), np.array([0.8, 0.7]))]
        >>> round(average_precision(preds, truth), 4)  # ranks: TP, FP, TP -> 0.5 + 0.5 * 2/3
        0.8333
    """
    if len(predictions) != len(truths):
        raise ValueError(f"predictions: {len(predictions)} images, truths: {len(truths)}")
    total = sum(int(np.asarray(t).reshape(-1, 4).shape[0]) for t in truths)
    if total == 0:
        return float("nan")
    ranked: list[tuple[float, int, int]] = []  # (score, image, prediction)
    for i, (boxes, scores) in enumerate(predictions):
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if np.asarray(boxes).reshape(-1, 4).shape[0] != scores.size:
            raise ValueError(f"image {i}: boxes and scores differ in number")
        ranked.extend((float(s), i, k) for k, s in enumerate(scores))
    ranked.sort(key=lambda r: -r[0])  # stable: ties keep image order
    ious = [
        iou_matrix(np.asarray(p[0]).reshape(-1, 4), t)
        for p, t in zip(predictions, truths, strict=True)
    ]
    used = [np.zeros(np.asarray(t).reshape(-1, 4).shape[0], dtype=bool) for t in truths]
    hits = np.zeros(len(ranked))
    for r, (_, i, k) in enumerate(ranked):
        row = ious[i][k] if ious[i].shape[1] else np.zeros(0)
        candidates = np.where(~used[i], row, -1.0)
        if candidates.size and candidates.max() >= iou_threshold:
            used[i][int(candidates.argmax())] = True
            hits[r] = 1
    tp = np.cumsum(hits)
    recall = tp / total
    precision = tp / np.arange(1, len(ranked) + 1)
    # every-point interpolation: precision made non-increasing from the right
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(ranked) else precision
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * envelope).sum())


def caption_accuracy(answers: Sequence[str], objects: Sequence[Sequence[ToyObject]]) -> float:
    """Fraction of answers mentioning exactly their scene's objects (multiset of (colour, shape)).

    Example:
        >>> objs = [ToyObject("circle", "red", (0, 0, 1, 1))]
        >>> caption_accuracy(["a red circle", "a blue circle"], [objs, objs])
        0.5
    """
    if len(answers) != len(objects) or not answers:
        raise ValueError(f"answers: {len(answers)} answers for {len(objects)} scenes")
    return float(np.mean([caption_correct(a, o) for a, o in zip(answers, objects, strict=True)]))


def qa_accuracy(answers: Sequence[str], truths: Sequence[str]) -> float:
    """Fraction of answers equal to the truth after :func:`normalise_answer`.

    Example:
        >>> round(qa_accuracy(["Yes.", "two", "red"], ["yes", "three", "red"]), 4)
        0.6667
    """
    if len(answers) != len(truths) or not answers:
        raise ValueError(f"answers: {len(answers)} answers for {len(truths)} truths")
    correct = [
        normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, truths, strict=True)
    ]
    return float(np.mean(correct))


__all__ = ["average_precision", "caption_accuracy", "iou_matrix", "qa_accuracy"]
