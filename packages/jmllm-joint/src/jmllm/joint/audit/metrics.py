"""Metrics of the hallucination audit: POPE's scores with bootstrap intervals, OWL-ViT's
confidence behind J's answers, and per-class rates.

Conventions, once:

- **Answers** are parsed by a named rule (:func:`jmllm.joint.audit.parse_answer`); questions
  answered neither yes nor no are *unparsed*: counted, left out of every metric below.
- **POPE** (Li et al., EMNLP 2023): "yes" is the positive prediction, a present class the
  positive truth. accuracy = (TP + TN) / n, precision = TP / (TP + FP), recall = TP / (TP + FN),
  F1 = 2 TP / (2 TP + FP + FN), yes-ratio = (TP + FP) / n. A ratio with a zero denominator is
  undefined (``null`` in JSON), never 0.
- **Intervals**: percentile bootstrap (``scipy.stats.bootstrap``, seeded) that resamples
  *images*, not questions: the questions about one image share its embedding and are not
  independent. Resamples where a metric is undefined are left out of its interval (their number
  is reported); with fewer than two images there is no interval.
- **AUROC** of OWL-ViT's score for predicting J's "yes": the probability that a "yes" question
  has a higher score than a "no" question, ties counting one half (the Mann–Whitney U statistic
  divided by the number of pairs); undefined without both answers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
CONFIDENCE_GROUPS = ("yes_present", "no_present", "yes_absent", "no_absent")


@dataclass(frozen=True)
class Confusion:
    """POPE's counts: "yes" is the positive prediction, a present class the positive truth."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self) -> dict[str, float | None]:
        """accuracy, precision, recall, f1 and yes_ratio (None where undefined).

        Example:
            >>> Confusion(tp=3, fp=1, tn=4, fn=2).metrics()["f1"]
            0.6666666666666666
        """
        return dict(
            zip(POPE_METRICS, pope_metrics(self.tp, self.fp, self.tn, self.fn), strict=True)
        )


def _ratio(num: Any, den: Any) -> Any:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def pope_metrics(tp: Any, fp: Any, tn: Any, fn: Any) -> tuple[Any, ...]:
    """(accuracy, precision, recall, f1, yes_ratio) of counts (scalars or arrays, NaN where
    undefined for arrays, None for scalars).

    Example:
        >>> pope_metrics(3, 1, 4, 2)
        (0.7, 0.75, 0.6, 0.6666666666666666, 0.4)
    """
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    n = tp + fp + tn + fn
    values = (
        _ratio(tp + tn, n),
        _ratio(tp, tp + fp),
        _ratio(tp, tp + fn),
        _ratio(2 * tp, 2 * tp + fp + fn),
        _ratio(tp + fp, n),
    )
    if values[0].ndim == 0:
        return tuple(None if math.isnan(float(v)) else float(v) for v in values)
    return values


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` labels (ties count half).

    Returns:
        The AUROC, or None without both labels.

    Example:
        >>> auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False])
        0.75
    """
    from scipy.stats import mannwhitneyu

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    u = mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic").statistic
    return float(u) / (len(pos) * len(neg))


@dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile bootstrap intervals of the POPE metrics, resampling images."""

    intervals: dict[str, tuple[float, float] | None]
    undefined: dict[str, int]  # resamples where the metric was undefined
    resamples: int
    confidence: float
    seed: int


def bootstrap_pope(
    per_image: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapIntervals:
    """Bootstrap intervals of the POPE metrics from per-image counts.

    Args:
        per_image: (n_images, 4) TP, FP, TN, FN of each image's parsed questions.
        n_resamples: bootstrap resamples.
        confidence: coverage of the intervals.
        seed: seed of the resampling (same seed, same intervals).

    Returns:
        :class:`BootstrapIntervals` (no intervals with fewer than two images).

    Example:
        >>> counts = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
        >>> b = bootstrap_pope(counts, n_resamples=200)
        >>> lo, hi = b.intervals["accuracy"]; lo <= 4 / 6 <= hi
        True
    """
    from scipy.stats import bootstrap

    counts = np.asarray(per_image, dtype=np.float64).reshape(-1, 4)  # (I, 4)
    empty = BootstrapIntervals(
        dict.fromkeys(POPE_METRICS), dict.fromkeys(POPE_METRICS, 0), n_resamples, confidence, seed
    )
    if counts.shape[0] < 2:
        return empty

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        picked = counts[index.astype(np.int64)].sum(axis=-2)  # (..., 4)
        return np.stack(pope_metrics(*np.moveaxis(picked, -1, 0)))  # (5, ...)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN of undefined resamples
        res = bootstrap(
            (np.arange(counts.shape[0]),),
            statistic,
            n_resamples=n_resamples,
            vectorized=True,
            method="percentile",
            confidence_level=confidence,
            rng=np.random.default_rng(seed),
        )
    distribution = res.bootstrap_distribution  # (5, R)
    alpha = (1 - confidence) / 2
    intervals: dict[str, tuple[float, float] | None] = {}
    undefined: dict[str, int] = {}
    for m, name in enumerate(POPE_METRICS):
        values = distribution[m]
        missing = int(np.isnan(values).sum())
        undefined[name] = missing
        low, high = float(res.confidence_interval.low[m]), float(res.confidence_interval.high[m])
        if missing and missing < len(values):
            # scipy's percentile of a distribution holding NaN is NaN: use the defined ones
            low, high = (float(v) for v in np.nanquantile(values, [alpha, 1 - alpha]))
        intervals[name] = None if math.isnan(low) or math.isnan(high) else (low, high)
    return BootstrapIntervals(intervals, undefined, n_resamples, confidence, seed)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def audit_metrics(
    records: Sequence[Any],
    rule: str = "authors",
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of the audit report from its records.

    Args:
        records: :class:`~jmllm.joint.audit.AuditRecord` (image_id, class_name, present,
            owl_score, ``parsed(rule)``).
        rule: the answer parsing rule.
        n_resamples, confidence, seed: the bootstrap.

    Returns:
        A JSON-ready dict: ``questions``, ``unparsed``, ``answers`` (yes/no/other counts),
        ``pope`` (metrics and counts), ``pope_ci``, ``bootstrap``, ``owl_confidence`` (means and
        counts per group), ``auroc_owl_predicts_yes`` (all parsed questions, and per truth),
        ``per_class``.

    Example:
        >>> m = audit_metrics(result.records)  # doctest: +SKIP
        >>> m["pope"]["accuracy"], m["auroc_owl_predicts_yes"]  # doctest: +SKIP
    """
    parsed = [(r, r.parsed(rule)) for r in records]
    answers = {"yes": 0, "no": 0, "other": 0}
    for _, p in parsed:
        answers[p] += 1
    image_ids = list(dict.fromkeys(r.image_id for r in records))
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    per_image = np.zeros((len(image_ids), 4), dtype=np.int64)  # TP, FP, TN, FN
    groups: dict[str, list[float]] = {g: [] for g in CONFIDENCE_GROUPS}
    for r, p in parsed:
        if p == "other":
            continue
        column = {(True, "yes"): 0, (False, "yes"): 1, (False, "no"): 2, (True, "no"): 3}
        per_image[row[r.image_id], column[(r.present, p)]] += 1
        groups[f"{p}_{'present' if r.present else 'absent'}"].append(r.owl_score)
    tp, fp, tn, fn = (int(v) for v in per_image.sum(axis=0))
    confusion = Confusion(tp, fp, tn, fn)
    boot = bootstrap_pope(per_image, n_resamples, confidence, seed)
    answered = [(r, p) for r, p in parsed if p != "other"]

    def auc(subset: list[tuple[Any, str]]) -> float | None:
        return auroc([r.owl_score for r, _ in subset], [p == "yes" for _, p in subset])

    return {
        "questions": len(records),
        "unparsed": answers["other"],
        "images": len(image_ids),
        "parse_rule": rule,
        "answers": answers,
        "pope": {**confusion.metrics(), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": confusion.n},
        "pope_ci": {k: list(v) if v else None for k, v in boot.intervals.items()},
        "bootstrap": {
            "method": "percentile",
            "unit": "image",
            "resamples": boot.resamples,
            "confidence": boot.confidence,
            "seed": boot.seed,
            "undefined_resamples": boot.undefined,
        },
        "owl_confidence": {g: _mean(v) for g, v in groups.items()},
        "owl_confidence_counts": {g: len(v) for g, v in groups.items()},
        "auroc_owl_predicts_yes": auc(answered),
        "auroc_owl_predicts_yes_present": auc([(r, p) for r, p in answered if r.present]),
        "auroc_owl_predicts_yes_absent": auc([(r, p) for r, p in answered if not r.present]),
        "per_class": per_class(parsed),
    }


def per_class(parsed: Sequence[tuple[Any, str]]) -> list[dict[str, Any]]:
    """One row per class: questions, unparsed, J's yes-rate on present classes (recall) and on
    absent classes (the positive-hallucination rate), mean OWL-ViT scores.

    Example:
        >>> from types import SimpleNamespace as R
        >>> rows = per_class([(R(class_name="cat", present=False, owl_score=0.5), "yes")])
        >>> rows[0]["hallucination_rate"]
        1.0
    """
    classes: dict[str, dict[str, Any]] = {}
    for r, p in parsed:
        row = classes.setdefault(
            r.class_name,
            {"present": [0, 0, 0], "absent": [0, 0, 0], "owl_present": [], "owl_absent": []},
        )
        side = "present" if r.present else "absent"
        row[side][{"yes": 0, "no": 1, "other": 2}[p]] += 1
        row[f"owl_{side}"].append(r.owl_score)
    out = []
    for name, row in classes.items():
        (py, pn, po), (ay, an, ao) = row["present"], row["absent"]
        out.append(
            {
                "class": name,
                "present_questions": py + pn + po,
                "absent_questions": ay + an + ao,
                "unparsed": po + ao,
                "recall": py / (py + pn) if py + pn else None,
                "hallucination_rate": ay / (ay + an) if ay + an else None,
                "mean_owl_present": _mean(row["owl_present"]),
                "mean_owl_absent": _mean(row["owl_absent"]),
            }
        )
    return sorted(out, key=lambda r: (-(r["hallucination_rate"] or 0.0), r["class"]))


__all__ = [
    "CONFIDENCE_GROUPS",
    "POPE_METRICS",
    "BootstrapIntervals",
    "Confusion",
    "audit_metrics",
    "auroc",
    "bootstrap_pope",
    "per_class",
    "pope_metrics",
]
