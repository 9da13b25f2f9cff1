"""The faithfulness report: every method × metric with image-level bootstrap intervals, paired
tests against GA, whether each metric separates the trained model from a randomised one, the
randomisation cascade — as ``faithfulness.json``, ``report.md``, curve PNGs and an HTML page.

The numbers are :mod:`jmllm.joint.faithfulness.summary` (its docstring holds the conventions:
intervals over images, paired tests against GA, separation), the pictures (curves, cascade,
example maps) :mod:`jmllm.joint.faithfulness.figures`; this module writes the files, with the
Markdown tables and the HTML page. Every name of the two is importable from here as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jmllm.align.files import atomic_write_bytes, atomic_write_text
from jmllm.joint.faithfulness.figures import (
    cascade_png,
    curves_png,
    example_pictures,
    method_colours,
)
from jmllm.joint.faithfulness.run import FaithfulnessResult
from jmllm.joint.faithfulness.stats import bootstrap_interval as bootstrap_interval
from jmllm.joint.faithfulness.stats import wilcoxon_p as wilcoxon_p
from jmllm.joint.faithfulness.summary import BOX_METRICS as BOX_METRICS
from jmllm.joint.faithfulness.summary import IOU_DELTAS as IOU_DELTAS
from jmllm.joint.faithfulness.summary import METRICS, read_run, summarise
from jmllm.joint.faithfulness.summary import PER_TARGET as PER_TARGET
from jmllm.joint.faithfulness.summary import REFERENCE as REFERENCE

REPORT_JSON = "faithfulness.json"
REPORT_MD = "report.md"
REPORT_HTML = "faithfulness.html"
CURVES_PNG = "curves.png"
CASCADE_PNG = "cascade.png"


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
    summary["seconds"] = round(result.seconds, 1)  # this invocation's wall time
    # a resumed run's seconds leave out the images an earlier invocation scored: say how many
    summary["images_scored_now"], summary["images_kept"] = result.processed, result.kept
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
