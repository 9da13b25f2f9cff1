"""The faithfulness report's numbers: every method × metric with intervals, paired tests, separation.

:func:`summarise` turns a run's records into the content of ``faithfulness.json``: every method ×
metric with image-level bootstrap intervals, paired tests against GA, whether each metric
separates the trained model from a randomised one, the randomisation cascade, the rankings and
the mean curves; :func:`read_run` reads a run's folder back for it, without the model.

Conventions (:mod:`jmllm.joint.faithfulness.stats`):

- **Intervals** resample *images* (percentile bootstrap, seeded): the targets of one image share
  its embedding and are not independent. A metric of several targets is their mean (the ratio of
  the resampled images' sums); MaxBoxAccV2's best threshold is chosen again in every resample.
- **Paired tests** against GA: per image, the mean difference over its targets (method − GA);
  a two-sided Wilcoxon signed-rank test of these differences and a bootstrap interval of their
  mean. MaxBoxAccV2 is a dataset-level maximum, so it gets the interval of the difference only.
- **Separation**: the same comparison between a method's maps on the trained J and its maps on
  the fully randomised J (the cascade's last stage), both scored against the same truth and the
  trained J's probabilities. A metric *separates* when the interval of that difference excludes
  0 on the metric's good side: only then does the metric tell a map that explains the model from
  one that does not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.joint.faithfulness.run import FaithfulnessResult
from jmllm.joint.faithfulness.stats import bootstrap_interval, wilcoxon_p
from jmllm.joint.model.internals import cascade_order

IOU_DELTAS = (0.3, 0.5, 0.7)
REFERENCE = "ga"  # the method every other one is compared with

# name → (the better direction, what it measures)
METRICS: dict[str, tuple[str, str]] = {
    "deletion_auc": (
        "lower",
        "area under the explained token's probability as the top-ranked patches of t are "
        "replaced by the baseline's (lower: the map found what the answer needs)",
    ),
    "insertion_auc": (
        "higher",
        "area under the probability as the top-ranked patches of t are put into the baseline",
    ),
    "deletion_auc_pixels": ("lower", "deletion with the patches' pixels replaced, re-embedded"),
    "insertion_auc_pixels": ("higher", "insertion in pixels, re-embedded"),
    "pointing": ("higher", "share of maps whose peak lies in the named object's box"),
    "maxboxacc_iou50": ("higher", "MaxBoxAccV2's best box accuracy at IoU ≥ 0.5"),
    "maxboxacc": ("higher", "MaxBoxAccV2: the mean over IoU 0.3, 0.5 and 0.7"),
    "randomisation_spearman": (
        "lower",
        "Spearman correlation with the same method's map on the fully randomised J (W, LM head "
        "and every decoder layer re-initialised); low: the map depends on the model",
    ),
    "randomisation_ssim": ("lower", "SSIM with the map on the fully randomised J"),
}
PER_TARGET = (
    "deletion_auc",
    "insertion_auc",
    "deletion_auc_pixels",
    "insertion_auc_pixels",
    "pointing",
    "randomisation_spearman",
    "randomisation_ssim",
)
BOX_METRICS = ("maxboxacc_iou50", "maxboxacc")


@dataclass
class _Units:
    """Per image (I of them), for one method and variant: each per-target metric's sum and
    the number of targets; MaxBoxAccV2's correct counts (I, δ, τ)."""

    sums: dict[str, np.ndarray]
    counts: np.ndarray
    correct: np.ndarray | None


def _units(lines: Sequence[dict[str, Any]], method: str, variant: str = "trained") -> _Units:
    rows = [line for line in lines if line["targets"]]
    counts = np.array([len(line["targets"]) for line in rows], dtype=np.float64)
    sums: dict[str, np.ndarray] = {}
    correct = None
    for metric in PER_TARGET:
        values = []
        for line in rows:
            total, ok = 0.0, True
            for target in line["targets"]:
                value = _value(target["methods"][method], metric, variant)
                if value is None:
                    ok = False
                    break
                total += float(value)
            values.append(total if ok else np.nan)
        array = np.array(values, dtype=np.float64)
        if not np.isnan(array).any():
            sums[metric] = array
    ious: list[np.ndarray] = []
    for line in rows:
        record = [_record(target["methods"][method], variant) for target in line["targets"]]
        if any(r is None or "ious" not in r for r in record):
            ious = []
            break
        per = np.array([r["ious"] for r in record if r is not None], dtype=np.float64)  # (n, T)
        ious.append(np.stack([(per >= d).sum(0) for d in IOU_DELTAS]))  # (δ, T)
    if ious:
        correct = np.stack(ious)  # (I, δ, T)
    return _Units(sums, counts, correct)


def _record(method_record: dict[str, Any], variant: str) -> dict[str, Any] | None:
    if variant == "trained":
        return method_record
    found: dict[str, Any] | None = method_record.get("randomised")
    return found


def _value(method_record: dict[str, Any], metric: str, variant: str) -> float | None:
    if metric.startswith("randomisation_"):
        if variant != "trained":
            return None
        cascade = method_record.get("cascade") or {}
        if not cascade:
            return None
        last = cascade[cascade_order(cascade)[-1]]  # the fully randomised J
        return float(last[metric.removeprefix("randomisation_")])
    record = _record(method_record, variant)
    if record is None or metric not in record:
        return None
    return float(record[metric])


def _box_value(correct: np.ndarray, counts: np.ndarray, metric: str) -> np.ndarray:
    """MaxBoxAccV2 from correct counts (..., I, δ, T) and target counts (..., I)."""
    accuracy = correct.sum(-3) / counts.sum(-1)[..., None, None]  # (..., δ, T)
    best = accuracy.max(-1)  # (..., δ)
    if metric == "maxboxacc_iou50":
        return best[..., IOU_DELTAS.index(0.5)]
    return best.mean(-1)


def _estimate(
    statistic: Callable[[np.ndarray], np.ndarray],
    units: int,
    boot: dict[str, Any],
    cost: int = 1,
) -> dict[str, Any]:
    value = float(statistic(np.arange(units)[None])[0])
    interval = bootstrap_interval(
        statistic, units, boot["confidence"], boot["resamples"], boot["seed"], cost
    )
    return {
        "value": value,
        "ci_low": interval[0] if interval else None,
        "ci_high": interval[1] if interval else None,
    }


def _metric_statistic(u: _Units, metric: str) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    if metric in BOX_METRICS:
        assert u.correct is not None
        correct = u.correct

        def box(index: np.ndarray) -> np.ndarray:
            return _box_value(correct[index], u.counts[index], metric)

        return box, correct.shape[1] * correct.shape[2]
    sums = u.sums[metric]

    def mean(index: np.ndarray) -> np.ndarray:
        result: np.ndarray = sums[index].sum(-1) / u.counts[index].sum(-1)
        return result

    return mean, 1


def _has(u: _Units, metric: str) -> bool:
    return u.correct is not None if metric in BOX_METRICS else metric in u.sums


def _difference(a: _Units, b: _Units, metric: str, boot: dict[str, Any]) -> dict[str, Any]:
    """``a − b`` of one metric, paired by image: value, interval, Wilcoxon p (None for
    MaxBoxAccV2) and the number of images."""
    stat_a, cost = _metric_statistic(a, metric)
    stat_b, _ = _metric_statistic(b, metric)

    def diff(index: np.ndarray) -> np.ndarray:
        result: np.ndarray = stat_a(index) - stat_b(index)
        return result

    out = _estimate(diff, len(a.counts), boot, cost)
    if metric in BOX_METRICS:
        out["wilcoxon_p"] = None
    else:
        out["wilcoxon_p"] = wilcoxon_p((a.sums[metric] - b.sums[metric]) / a.counts)
    out["images"] = len(a.counts)
    return out


def summarise(
    result: FaithfulnessResult | dict[str, Any],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of the report (the content of ``faithfulness.json``) from a run's records.

    Args:
        result: :class:`~jmllm.joint.faithfulness.run.FaithfulnessResult`, or a dict with
            ``lines``, ``settings`` and ``source`` (e.g. read back from a run's folder).
        resamples, confidence, seed: the bootstrap.

    Returns:
        ``{"methods": {method: {metric: {value, ci_low, ci_high}}}, "paired": …, "separation":
        …, "cascade": …, "ranking": …, "curves": …, …}`` (see ``docs/faithfulness.md``).

    Example:
        >>> summary = summarise(result)  # doctest: +SKIP
        >>> summary["methods"]["ga"]["deletion_auc"]  # doctest: +SKIP
        {'value': 0.21, 'ci_low': 0.18, 'ci_high': 0.24}
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    if isinstance(result, FaithfulnessResult):
        lines, settings = result.lines, result.settings.to_dict()
        source, failed = result.source, result.failed
    else:
        lines, settings = result["lines"], result["settings"]
        source, failed = result.get("source", {}), result.get("failed", {})
    boot = {"resamples": resamples, "confidence": confidence, "seed": seed, "unit": "image"}
    methods = list(settings["methods"])
    scored = [line for line in lines if line["targets"]]
    if not scored:
        raise ValueError("no target was scored: nothing to report")
    units = {m: _units(scored, m) for m in methods}
    randomised = {m: _units(scored, m, "randomised") for m in methods}
    table: dict[str, dict[str, Any]] = {}
    for m in methods:
        table[m] = {}
        for metric in METRICS:
            if _has(units[m], metric):
                stat, cost = _metric_statistic(units[m], metric)
                table[m][metric] = _estimate(stat, len(scored), boot, cost)
    paired: dict[str, dict[str, Any]] = {}
    if REFERENCE in methods:
        for m in methods:
            if m == REFERENCE:
                continue
            paired[m] = {
                metric: _difference(units[m], units[REFERENCE], metric, boot)
                for metric in METRICS
                if _has(units[m], metric) and _has(units[REFERENCE], metric)
            }
    separation: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows = {}
        for metric, (direction, _) in METRICS.items():
            if not (_has(units[m], metric) and _has(randomised[m], metric)):
                continue
            d = _difference(units[m], randomised[m], metric, boot)
            good = d["ci_low"] if direction == "higher" else d["ci_high"]
            d["separates"] = good is not None and (good > 0 if direction == "higher" else good < 0)
            d["trained"] = table[m][metric]["value"]
            stat, _ = _metric_statistic(randomised[m], metric)
            d["randomised"] = float(stat(np.arange(len(scored))[None])[0])
            rows[metric] = d
        if rows:
            separation[m] = rows
    return {
        "format": 1,
        "source": source,
        "settings": settings,
        "images": len(scored),
        "images_without_targets": len(lines) - len(scored),
        "images_failed": len(failed),
        "failed": dict(failed),
        "targets": sum(len(line["targets"]) for line in scored),
        "unscored_mentions": sum(int(line.get("unscored", 0)) for line in lines),
        "bootstrap": boot,
        "metrics": {k: {"better": d, "what": w} for k, (d, w) in METRICS.items()},
        "methods": table,
        "paired": {"reference": REFERENCE, "methods": paired},
        "separation": separation,
        "cascade": _cascade(scored, methods, boot),
        "ranking": _ranking(table),
        "curves": _mean_curves(scored, settings),
    }


def _cascade(
    lines: Sequence[dict[str, Any]], methods: Sequence[str], boot: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        stages = cascade_order(lines[0]["targets"][0]["methods"][m].get("cascade") or {})
        rows = []
        for stage in stages:
            entry: dict[str, Any] = {"stage": stage}
            for key in ("spearman", "ssim"):
                sums = np.array(
                    [sum(t["methods"][m]["cascade"][stage][key] for t in line["targets"])
                     for line in lines],
                    dtype=np.float64,
                )  # fmt: skip
                counts = np.array([len(line["targets"]) for line in lines], dtype=np.float64)

                def mean(index: np.ndarray, s: np.ndarray = sums, c: np.ndarray = counts) -> Any:
                    return s[index].sum(-1) / c[index].sum(-1)

                entry[key] = _estimate(mean, len(lines), boot)
            rows.append(entry)
        if rows:
            out[m] = rows
    return out


def _ranking(table: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    ranking = {}
    for metric, (direction, _) in METRICS.items():
        scored = [(m, row[metric]["value"]) for m, row in table.items() if metric in row]
        if scored:
            reverse = direction == "higher"
            ranking[metric] = [m for m, _ in sorted(scored, key=lambda x: x[1], reverse=reverse)]
    return ranking


def _mean_curves(lines: Sequence[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    steps = int(settings["steps"])
    out: dict[str, Any] = {"fractions": [s / steps for s in range(steps + 1)]}
    for key in lines[0]["targets"][0].get("curves", {}):
        per_method: dict[str, list[float]] = {}
        for m in settings["methods"]:
            stacked = np.array(
                [t["curves"][key][m] for line in lines for t in line["targets"]], dtype=np.float64
            )
            per_method[m] = [round(float(v), 6) for v in stacked.mean(0)]
        out[key] = per_method
    return out


def read_run(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A run folder's settings and records, for :func:`summarise` without the model.

    Example:
        >>> summary = summarise(read_run("faith-out"))  # doctest: +SKIP
    """
    from jmllm.align.files import read_jsonl
    from jmllm.joint.faithfulness.run import RESULTS_FILE, SETTINGS_FILE

    root = Path(folder)
    doc = json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))
    digest = doc["digest"]
    lines: dict[str, dict[str, Any]] = {}
    for line in read_jsonl(root / RESULTS_FILE):
        if line.get("settings") == digest:
            lines[str(line["item_id"])] = line
    return {"lines": list(lines.values()), "settings": doc["settings"], "source": doc["source"]}
