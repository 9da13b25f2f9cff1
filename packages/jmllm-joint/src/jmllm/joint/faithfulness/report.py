"""The faithfulness report: every method × metric with image-level bootstrap intervals, paired
tests against GA, whether each metric separates the trained model from a randomised one, the
randomisation cascade — as ``faithfulness.json``, ``report.md``, curve PNGs and an HTML page.

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

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.align.files import atomic_write_bytes, atomic_write_text
from jmllm.joint.faithfulness.run import FaithfulnessResult
from jmllm.joint.faithfulness.stats import bootstrap_interval, wilcoxon_p

REPORT_JSON = "faithfulness.json"
REPORT_MD = "report.md"
REPORT_HTML = "faithfulness.html"
CURVES_PNG = "curves.png"
CASCADE_PNG = "cascade.png"
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
        last = cascade[list(cascade)[-1]]
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
        stages = list(lines[0]["targets"][0]["methods"][m].get("cascade") or {})
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


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

# one colour per method, the Okabe–Ito palette (colour-blind safe) then greys
_COLOURS = (
    "#000000", "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#999999", "#666666", "#bbbbbb",
)  # fmt: skip


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """A colour per method, GA's black, in the order given."""
    return {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(methods)}


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curves_png(summary: dict[str, Any]) -> bytes:
    """The mean deletion and insertion curves of every method, one panel per space and curve.

    Example:
        >>> curves_png(summary)[:4] == b"\\x89PNG"  # doctest: +SKIP
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = summary["curves"]
    keys = [k for k in curves if k != "fractions"]
    methods = list(summary["settings"]["methods"])
    colours = method_colours(methods)
    fig = Figure(figsize=(5.2 * max(1, len(keys)) / 1.35, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    x = np.asarray(curves["fractions"])
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        space, curve = key.split("/")
        for m in methods:
            value = summary["methods"][m].get(_auc_name(space, curve), {}).get("value")
            label = f"{m} ({value:.3f})" if value is not None else m
            width = 2.4 if m == REFERENCE else 1.3
            ax.plot(x, curves[key][m], label=label, color=colours[m], linewidth=width)
        where = "t" if space == "t" else "pixels"
        ax.set_title(f"{curve} in {where}", fontsize=10)
        ax.set_xlabel("share of patches " + ("removed" if curve == "deletion" else "inserted"))
        ax.set_ylabel("probability of the explained token")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7)
    return _png(fig)


def _auc_name(space: str, curve: str) -> str:
    return f"{curve}_auc" + ("" if space == "t" else f"_{space}")


def cascade_png(summary: dict[str, Any]) -> bytes:
    """Spearman correlation of every method's map with its map on each randomised stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cascade = summary["cascade"]
    methods = [m for m in summary["settings"]["methods"] if m in cascade]
    colours = method_colours(list(summary["settings"]["methods"]))
    fig = Figure(figsize=(7.5, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if not methods:
        ax.text(0.5, 0.5, "no randomisation cascade in this run", ha="center", va="center")
        return _png(fig)
    stages = ["trained"] + [row["stage"] for row in cascade[methods[0]]]
    for m in methods:
        values = [1.0] + [row["spearman"]["value"] for row in cascade[m]]
        width = 2.4 if m == REFERENCE else 1.3
        ax.plot(range(len(stages)), values, marker="o", label=m, color=colours[m], linewidth=width)
    ax.set_xticks(range(len(stages)), stages, rotation=30, fontsize=8)
    ax.set_xlabel("randomised so far (cumulative, from W down through the language model)")
    ax.set_ylabel("Spearman with the trained model's map")
    ax.set_ylim(-0.25, 1.05)
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _cell(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if entry is None:
        return "—"
    value = f"{entry['value']:.{digits}f}"
    if entry.get("ci_low") is None:
        return value
    return f"{value} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _md_escape(text: str) -> str:
    """Text for a Markdown table cell: no markup, no pipes, one line."""
    out = " ".join(str(text).split())
    for ch in "\\`*_[]<>|#":
        out = out.replace(ch, "\\" + ch)
    return out


def markdown(summary: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """``report.md``: the tables of the summary."""
    metrics = [k for k in METRICS if any(k in row for row in summary["methods"].values())]
    lines = ["# Faithfulness of J's attribution methods", ""]
    for note in notes:
        lines += [f"> {_md_escape(note)}", ""]
    src = summary["source"]
    lines += [
        f"Data: {_md_escape(src.get('name', ''))} — {summary['images']} images, "
        f"{summary['targets']} explained targets ({summary['unscored_mentions']} mentions not "
        f"scored, {summary['images_failed']} images unreadable). Intervals: "
        f"{summary['bootstrap']['confidence']:.0%} percentile bootstrap over images, "
        f"{summary['bootstrap']['resamples']} resamples, seed {summary['bootstrap']['seed']}.",
        "",
        "## Methods × metrics",
        "",
        "| method | " + " | ".join(f"{m} ({METRICS[m][0]})" for m in metrics) + " |",
        "| --- | " + " | ".join("---" for _ in metrics) + " |",
    ]
    for m, row in summary["methods"].items():
        lines.append(f"| {m} | " + " | ".join(_cell(row.get(k)) for k in metrics) + " |")
    paired = summary["paired"]["methods"]
    if paired:
        lines += [
            "",
            f"## Against {summary['paired']['reference']} (paired by image: method − GA, "
            "Wilcoxon p)",
            "",
            "| method | " + " | ".join(metrics) + " |",
            "| --- | " + " | ".join("---" for _ in metrics) + " |",
        ]
        for m, row in paired.items():
            cells = [
                f"{_cell(row[k])}, p {_p(row[k]['wilcoxon_p'])}" if k in row else "—"
                for k in metrics
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if summary["separation"]:
        sep_metrics = [k for k in metrics if not k.startswith("randomisation_")]
        lines += [
            "",
            "## Trained against randomised maps (does the metric separate them?)",
            "",
            "Each cell: trained − randomised (the fully randomised J's maps, scored the same "
            "way), its interval, and ✓ when the interval lies on the metric's good side.",
            "",
            "| method | " + " | ".join(sep_metrics) + " |",
            "| --- | " + " | ".join("---" for _ in sep_metrics) + " |",
        ]
        for m, row in summary["separation"].items():
            cells = [
                f"{_cell(row[k])} {'✓' if row[k]['separates'] else '✗'}" if k in row else "—"
                for k in sep_metrics
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if summary["cascade"]:
        first = next(iter(summary["cascade"].values()))
        stages = [row["stage"] for row in first]
        lines += [
            "",
            "## Randomisation cascade (Spearman with the trained map)",
            "",
            "| method | " + " | ".join(stages) + " |",
            "| --- | " + " | ".join("---" for _ in stages) + " |",
        ]
        for m, rows in summary["cascade"].items():
            lines.append(f"| {m} | " + " | ".join(_cell(r["spearman"]) for r in rows) + " |")
    lines += ["", f"Curves: `{CURVES_PNG}`; cascade: `{CASCADE_PNG}`; page: `{REPORT_HTML}`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass
class FaithfulnessReport:
    """The written report: its summary and the files."""

    summary: dict[str, Any]
    json_path: Path
    markdown_path: Path
    curves_path: Path
    cascade_path: Path
    html_path: Path


def write_faithfulness_report(
    result: FaithfulnessResult,
    out: str | os.PathLike[str] | None = None,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    notes: Sequence[str] = (),
    examples: Sequence[Any] = (),
) -> FaithfulnessReport:
    """Write ``faithfulness.json``, ``report.md``, ``curves.png``, ``cascade.png`` and
    ``faithfulness.html`` into ``out`` (default the run's folder).

    Args:
        result: from :func:`~jmllm.joint.faithfulness.run.run_faithfulness`.
        out: the report folder.
        resamples, confidence, seed: the bootstrap.
        notes: short notices at the top of the report.
        examples: pictures for the page (:func:`example_pictures`).

    Example:
        >>> report = write_faithfulness_report(result, "faith-out")  # doctest: +SKIP
        >>> report.summary["ranking"]["deletion_auc"][0]  # doctest: +SKIP
        'ga'
    """
    folder = Path(out) if out is not None else result.out
    if folder is None:
        raise ValueError("out: the run was in memory; give a report folder")
    summary = summarise(result, resamples=resamples, confidence=confidence, seed=seed)
    summary["notes"] = list(notes)
    summary["seconds"] = round(result.seconds, 1)
    curves = curves_png(summary)
    cascade = cascade_png(summary)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_text(
        folder / REPORT_JSON, json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    )
    md_path = atomic_write_text(folder / REPORT_MD, markdown(summary, notes))
    curves_path = atomic_write_bytes(folder / CURVES_PNG, curves)
    cascade_path = atomic_write_bytes(folder / CASCADE_PNG, cascade)
    html_path = atomic_write_text(
        folder / REPORT_HTML, page(summary, curves, cascade, notes, examples)
    )
    return FaithfulnessReport(summary, json_path, md_path, curves_path, cascade_path, html_path)


def _data_url(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(
    summary: dict[str, Any],
    curves: bytes,
    cascade: bytes,
    notes: Sequence[str] = (),
    examples: Sequence[Any] = (),
) -> str:
    """The HTML page (Jinja2 template ``faithfulness.html``, autoescaped)."""
    from jmllm.joint.render.pages import render

    metrics = [k for k in METRICS if any(k in row for row in summary["methods"].values())]
    colours = method_colours(list(summary["settings"]["methods"]))
    rows = [
        {
            "name": m,
            "colour": colours[m],
            "cells": [_cell(row.get(k)) for k in metrics],
            "ranks": [
                summary["ranking"].get(k, []).index(m) + 1 if m in summary["ranking"].get(k, [])
                else None
                for k in metrics
            ],
        }
        for m, row in summary["methods"].items()
    ]  # fmt: skip
    paired = [
        {
            "name": m,
            "cells": [
                (_cell(row[k]), _p(row[k]["wilcoxon_p"])) if k in row else ("—", "")
                for k in metrics
            ],
        }
        for m, row in summary["paired"]["methods"].items()
    ]
    sep_metrics = [k for k in metrics if not k.startswith("randomisation_")]
    separation = [
        {
            "name": m,
            "cells": [
                (_cell(row[k]), row[k]["separates"]) if k in row else ("—", None)
                for k in sep_metrics
            ],
        }
        for m, row in summary["separation"].items()
    ]
    return render(
        "faithfulness.html",
        title="Faithfulness of J's attribution methods",
        summary=summary,
        notes=list(notes),
        metrics=[{"name": k, "better": METRICS[k][0], "what": METRICS[k][1]} for k in metrics],
        rows=rows,
        paired=paired,
        sep_metrics=sep_metrics,
        separation=separation,
        curves=_data_url(curves),
        cascade=_data_url(cascade),
        examples=[{"caption": caption, "url": _data_url(png)} for caption, png in examples],
    )


def example_pictures(
    model: Any,
    result: FaithfulnessResult,
    source: Any,
    count: int = 3,
    side: int = 160,
) -> list[tuple[str, bytes]]:
    """Every method's map of the first ``count`` targets of the run, over the image with the
    true boxes, one row per target: ``[(caption, PNG), ...]`` for the page.

    The maps are computed again (the run keeps numbers, not maps) on the trained J with the
    run's settings.
    """
    from PIL import Image, ImageDraw

    from jmllm.joint.render.drawing import BACKGROUND, INK, blend_map, figure
    from jmllm.joint.saliency.attribution import make_methods, prepare_request

    settings = result.settings
    methods = make_methods(
        settings.methods, model, ig_steps=settings.ig_steps, baseline=settings.baseline,
        seed=settings.seed,
    )  # fmt: skip
    items = {item.item_id: item for item in source.items}
    pictures: list[tuple[str, bytes]] = []
    for line in result.lines:
        item = items.get(line["item_id"])
        if item is None or not line["targets"]:
            continue
        emb = model.embed([item.load()])
        truths, _ = source.targets(model, emb, item)
        for truth in truths:
            if len(pictures) >= count:
                return pictures
            request = prepare_request(
                model, emb, source.prompt, truth.target, truth.answer, queries=truth.queries,
                template=source.template, occurrence=truth.occurrence,
            )  # fmt: skip
            image = emb.pil_image(0).resize((side, side), Image.Resampling.BICUBIC)
            sx, sy = side / request.image_size[0], side / request.image_size[1]
            tiles = []
            for name, method in methods.items():
                saliency = method.attribute_request(request).map((side, side))
                tile = blend_map(image, saliency)
                draw = ImageDraw.Draw(tile)
                for x0, y0, x1, y1 in truth.boxes:
                    draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=INK)
                tiles.append(figure(tile, name, font_size=12))
            width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
            height = max(t.height for t in tiles)
            strip = Image.new("RGB", (width, height), BACKGROUND)
            x = 0
            for tile in tiles:
                strip.paste(tile, (x, 0))
                x += tile.width + 4
            buf = io.BytesIO()
            strip.save(buf, format="PNG")
            caption = (
                f"{item.file}: “{request.label}” in “{request.answer_text}” — the "
                f"{truth.name}'s box in black"
            )
            pictures.append((caption, buf.getvalue()))
    return pictures


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


__all__ = [
    "CASCADE_PNG",
    "CURVES_PNG",
    "METRICS",
    "REPORT_HTML",
    "REPORT_JSON",
    "REPORT_MD",
    "FaithfulnessReport",
    "cascade_png",
    "curves_png",
    "example_pictures",
    "markdown",
    "method_colours",
    "page",
    "read_run",
    "summarise",
    "write_faithfulness_report",
]
