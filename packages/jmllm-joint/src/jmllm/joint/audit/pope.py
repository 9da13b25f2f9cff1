"""POPE as published: the official question files, the three harnesses' scoring rules and a
first-token logit rule, per split, averaged and pooled.

POPE (Li et al., EMNLP 2023) asks ``Is there a {object} in the image?`` about COCO val2014
images, half the objects present, half absent, in three splits that differ by how the absent
objects were drawn (``random``, ``popular``, ``adversarial``). :mod:`jmllm.joint.audit.pope_files`
reads its official files (:func:`load_pope`); :mod:`jmllm.joint.audit.pope_rules` holds the
rules of the three harnesses that published POPE numbers (``llava``, ``lmms-eval``,
``vlmevalkit``) and the ``first-token`` rule (:func:`rule_prediction`, :func:`rule_metrics`).

This module scores a run's answers: every split under a rule, their mean and the rows pooled
(:func:`split_metrics`), percentile bootstrap intervals over images
(:func:`bootstrap_intervals`), the first-token rule's threshold curve
(:func:`threshold_curve`), J's errors split by OWL-ViT's evidence
(:func:`perception_vs_language`) and where the rules disagree (:func:`disagreements`). It still
exports every name of the files and the rules.

Example:
    >>> rule_prediction("No, there is not.", "llava"), rule_prediction("Yes.", "lmms-eval")
    ('no', 'other')
    >>> rule_prediction("Yes.", "vlmevalkit")
    'yes'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jmllm.joint.audit.data import AuditError  # noqa: F401
from jmllm.joint.audit.pope_files import (
    POPE_QUESTION,
    POPE_SPLITS,
    RANDOM_ROWS_PINNED_BY_LLAVA,  # noqa: F401
    SINGLE_WORD_PROMPT,
    PopeData,
    PopeRow,
    PopeSplitFile,
    find_pope_files,
    load_pope,
    question_object,
    read_split,
)
from jmllm.joint.audit.pope_rules import (
    POPE_METRICS,
    POPE_RULES,
    first_token_margin,
    llava_rule,
    lmms_eval_rule,
    rule_metrics,
    rule_prediction,
    vlmevalkit_rule,
    vqa_punctuation,
    yes_no_token_ids,  # noqa: F401
)

# ---------------------------------------------------------------------------------------------
# Scoring a run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeAnswer:
    """J's answer to one distinct question of an image, with OWL-ViT's evidence.

    Attributes:
        answer: the answer text; finished: it ended with end-of-sequence.
        margin: the first token's yes-minus-no log-odds (None if not computed).
        owl_score: OWL-ViT's best score for the question's object on the same ``t``.
        box: the best patch's box, ``x0, y0, x1, y1`` in pixels of the original image.
    """

    answer: str
    finished: bool = True
    margin: float | None = None
    owl_score: float | None = None
    box: tuple[float, ...] | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class ScoredRow:
    """A row of a split with J's answer and its prediction under a rule."""

    row: PopeRow
    answer: PopeAnswer
    prediction: str


def score_rows(
    rows: Iterable[PopeRow],
    answers: Mapping[tuple[str, str], PopeAnswer],
    rule: str,
    threshold: float = 0.0,
) -> list[ScoredRow]:
    """Every row that has an answer (keyed by image and question text), predicted by ``rule``."""
    out = []
    for row in rows:
        answer = answers.get((row.image, row.text))
        if answer is None:
            continue
        pred = rule_prediction(answer.answer, rule, answer.margin, threshold)
        out.append(ScoredRow(row, answer, pred))
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean([float(v) for v in values if v is not None]))


def split_metrics(scored: Sequence[ScoredRow], rule: str, splits: Sequence[str]) -> dict[str, Any]:
    """``{split: metrics, "mean": …, "pooled": …}``: every split's :func:`~jmllm.joint.audit.pope_rules.rule_metrics`, their
    mean (LLaVA's MODEL_ZOO figure; a metric undefined in one split is undefined in the mean)
    and the metrics of all rows pooled (VLMEvalKit's Overall, lmms-eval's ``pope`` task)."""
    out: dict[str, Any] = {}
    for split in splits:
        rows = [s for s in scored if s.row.split == split]
        out[split] = rule_metrics(rule, [s.row.label for s in rows], [s.prediction for s in rows])
    present = [s for s in splits if out[s]["n"]]
    out["mean"] = {m: _mean([out[s][m] for s in present]) for m in POPE_METRICS}
    out["mean"]["splits"] = present
    out["pooled"] = rule_metrics(
        rule, [s.row.label for s in scored], [s.prediction for s in scored]
    )
    return out


def _ratio_array(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def metrics_from_counts(counts: np.ndarray, rule: str) -> dict[str, np.ndarray]:
    """:func:`~jmllm.joint.audit.pope_rules.rule_metrics` of summed counts, vectorised: ``counts`` (..., 6) holds TP, FP, TN,
    FN, other answers on present objects, other answers on absent ones; NaN where undefined."""
    tp, fp, tn, fn, other_pos, other_neg = np.moveaxis(np.asarray(counts, float), -1, 0)
    n = tp + fp + tn + fn + other_pos + other_neg
    missed = fn + (other_pos if rule == "vlmevalkit" else 0.0)
    precision = _ratio_array(tp, tp + fp)
    recall = _ratio_array(tp, tp + missed)
    with np.errstate(invalid="ignore"):
        f1 = _ratio_array(2 * precision * recall, precision + recall)
    return {
        "accuracy": _ratio_array(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1),
        "yes_ratio": _ratio_array(tp + fp, n),
    }


def bootstrap_intervals(
    scored: Sequence[ScoredRow],
    rule: str,
    splits: Sequence[str],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of every split's metrics, their mean and the pooled rows,
    resampling **images** (an image's questions share its embedding, and its positive questions
    are shared by the splits): one draw of images serves every split of a resample.

    Returns:
        ``{split|"mean"|"pooled": {metric: [low, high] or None}}`` (None: fewer than two images
        or no resample where the metric is defined), and ``undefined_resamples``.

    Example:
        >>> bootstrap_intervals(scored, "llava", ["random"])["random"]["f1"]  # doctest: +SKIP
        [0.81, 0.9]
    """
    images = list(dict.fromkeys(s.row.image for s in scored))
    index = {image: i for i, image in enumerate(images)}
    column = {("yes", "yes"): 0, ("yes", "no"): 1, ("no", "no"): 2, ("no", "yes"): 3}
    counts = np.zeros((len(splits), len(images), 6))  # (K, I, 6)
    position = {split: k for k, split in enumerate(splits)}
    for s in scored:
        if s.row.split not in position:
            continue
        if s.prediction in ("yes", "no"):
            c = column[(s.prediction, s.row.label)]
        else:
            c = 4 if s.row.present else 5
        counts[position[s.row.split], index[s.row.image], c] += 1
    names = [*splits, "mean", "pooled"]
    out: dict[str, Any] = {name: dict.fromkeys(POPE_METRICS) for name in names}
    out["undefined_resamples"] = {name: dict.fromkeys(POPE_METRICS, 0) for name in names}
    if len(images) < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(images), size=(n_resamples, len(images)))  # (R, I)
    weights = np.stack([np.bincount(d, minlength=len(images)) for d in draws])  # (R, I)
    sums = np.einsum("ri,kic->krc", weights, counts)  # (K, R, 6)
    per_split = metrics_from_counts(sums, rule)  # metric -> (K, R)
    present = [k for k, split in enumerate(splits) if counts[k].sum() > 0]
    values: dict[str, dict[str, np.ndarray]] = {
        split: {m: per_split[m][k] for m in POPE_METRICS} for k, split in enumerate(splits)
    }
    values["mean"] = {m: per_split[m][present].mean(axis=0) for m in POPE_METRICS}
    pooled = metrics_from_counts(sums.sum(axis=0), rule)
    values["pooled"] = {m: pooled[m] for m in POPE_METRICS}
    alpha = (1 - confidence) / 2
    for name in names:
        for metric in POPE_METRICS:
            draw = values[name][metric]
            defined = draw[~np.isnan(draw)]
            out["undefined_resamples"][name][metric] = int(len(draw) - len(defined))
            if len(defined):
                low, high = np.quantile(defined, [alpha, 1 - alpha])
                out[name][metric] = [float(low), float(high)]
    return out


HEADLINES = {
    "llava": ("mean", "LLaVA's MODEL_ZOO: the mean of the three splits' F1"),
    "lmms-eval": ("pooled", "lmms-eval's pope task: F1 over its rows in one pool"),
    "vlmevalkit": ("pooled", "VLMEvalKit's Overall: one F1 pooled over the splits"),
    "first-token": ("mean", "the mean of the splits' F1, as LLaVA's"),
}


def threshold_curve(
    scored: Sequence[ScoredRow], splits: Sequence[str], points: int = 101
) -> dict[str, Any]:
    """The ``first-token`` rule's metrics as its threshold moves: at most ``points``
    thresholds (quantiles of the margins, and 0), per split and their mean.

    Returns:
        ``thresholds`` and, per split and ``mean``, lists of every metric; ``best_f1`` per split
        (threshold and F1: chosen on the data itself, an optimistic figure); ``auroc`` of the
        margin for the truth.

    Example:
        >>> curve = threshold_curve(scored, ["random"])  # doctest: +SKIP
        >>> curve["random"]["f1"][curve["thresholds"].index(0.0)]  # doctest: +SKIP
    """
    from jmllm.joint.audit.metrics import auroc

    usable = [s for s in scored if s.answer.margin is not None and math.isfinite(s.answer.margin)]
    if not usable:
        return {"thresholds": [], "available": False}
    margins = np.array([s.answer.margin for s in usable], dtype=np.float64)
    quantiles = np.quantile(margins, np.linspace(0.0, 1.0, max(2, points - 1)))
    # just below the smallest margin everything is yes; the quantiles and 0 in between
    grid = sorted({float(margins.min()) - 1e-6, 0.0, *(float(q) for q in quantiles)})
    out: dict[str, Any] = {"thresholds": grid, "available": True}
    for split in [*splits, "mean"]:
        out[split] = {m: [] for m in POPE_METRICS}
    for threshold in grid:
        rescored = [
            ScoredRow(s.row, s.answer, "yes" if s.answer.margin > threshold else "no")  # type: ignore[operator]
            for s in usable
        ]
        metrics = split_metrics(rescored, "first-token", splits)
        for split in [*splits, "mean"]:
            for m in POPE_METRICS:
                out[split][m].append(metrics[split][m])
    out["best_f1"] = {}
    for split in [*splits, "mean"]:
        f1 = [v if v is not None else -1.0 for v in out[split]["f1"]]
        best = int(np.argmax(f1))
        out["best_f1"][split] = {"threshold": grid[best], "f1": out[split]["f1"][best]}
    out["auroc"] = auroc(margins.tolist(), [s.row.present for s in usable])
    return out


@dataclass
class PerceptionSplit:
    """J's hallucinations (wrong yes/no answers) split by OWL-ViT's evidence on the same ``t``:
    ``perception`` where OWL-ViT was already wrong (scored an absent object at or above the
    threshold, or a present one below it), ``language`` where OWL-ViT was right and the LLM still
    erred. Fractions of the errors with OWL-ViT evidence; counts by kind."""

    threshold: float
    errors: int = 0
    perception: int = 0
    language: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    no_evidence: int = 0  # errors without an OWL-ViT score (a question of another form)

    def add(self, kind: str, owl_wrong: bool | None) -> None:
        """Count one error of ``kind`` (``positive``: yes to an absent object; ``negative``: no
        to a present one); ``owl_wrong`` None: no evidence."""
        self.errors += 1
        if owl_wrong is None:
            self.no_evidence += 1
            return
        side = "perception" if owl_wrong else "language"
        setattr(self, side, getattr(self, side) + 1)
        counts = self.by_kind.setdefault(kind, {"perception": 0, "language": 0})
        counts[side] += 1

    def to_json(self) -> dict[str, Any]:
        judged = self.perception + self.language
        return {
            "perception": self.perception / judged if judged else None,
            "language": self.language / judged if judged else None,
            "counts": {"perception": self.perception, "language": self.language},
            "errors": self.errors,
            "without_evidence": self.no_evidence,
            "by_kind": self.by_kind,
            "owl_threshold": self.threshold,
        }


def perception_vs_language(scored: Sequence[ScoredRow], threshold: float) -> PerceptionSplit:
    """Split J's wrong yes/no answers by whether OWL-ViT's score on the same ``t`` was already
    wrong at ``threshold`` (see :class:`PerceptionSplit`); unparsed answers are not errors.

    Example:
        >>> perception_vs_language(scored, 0.1).to_json()["perception"]  # doctest: +SKIP
        0.62
    """
    split = PerceptionSplit(threshold)
    for s in scored:
        if s.prediction not in ("yes", "no") or s.prediction == s.row.label:
            continue
        kind = "positive" if s.prediction == "yes" else "negative"
        score = s.answer.owl_score
        owl_wrong = None if score is None else (score >= threshold) != s.row.present
        split.add(kind, owl_wrong)
    return split


def disagreements(
    rows: Sequence[PopeRow], answers: Mapping[tuple[str, str], PopeAnswer], threshold: float = 0.0
) -> dict[str, Any]:
    """How often the rules disagree on the same answers: for every pair of rules, the rows they
    predict differently, and up to five example answers.

    Example:
        >>> disagreements(data.rows, answers)["llava|lmms-eval"]["rows"]  # doctest: +SKIP
    """
    predictions = {
        rule: [p.prediction for p in score_rows(rows, answers, rule, threshold)]
        for rule in POPE_RULES
    }
    texts = [answers[(r.image, r.text)].answer for r in rows if (r.image, r.text) in answers]
    out: dict[str, Any] = {}
    for i, a in enumerate(POPE_RULES):
        for b in POPE_RULES[i + 1 :]:
            differ = [
                k
                for k, (x, y) in enumerate(zip(predictions[a], predictions[b], strict=True))
                if x != y
            ]
            examples = list(dict.fromkeys(texts[k] for k in differ))[:5]
            out[f"{a} vs {b}"] = {"rows": len(differ), "examples": examples}
    return out


__all__ = [
    "HEADLINES",
    "POPE_METRICS",
    "POPE_QUESTION",
    "POPE_RULES",
    "POPE_SPLITS",
    "SINGLE_WORD_PROMPT",
    "PerceptionSplit",
    "PopeAnswer",
    "PopeData",
    "PopeRow",
    "PopeSplitFile",
    "ScoredRow",
    "bootstrap_intervals",
    "disagreements",
    "find_pope_files",
    "first_token_margin",
    "llava_rule",
    "lmms_eval_rule",
    "load_pope",
    "metrics_from_counts",
    "perception_vs_language",
    "question_object",
    "read_split",
    "rule_metrics",
    "rule_prediction",
    "score_rows",
    "split_metrics",
    "threshold_curve",
    "vlmevalkit_rule",
    "vqa_punctuation",
]
