"""The report of a POPE or CHAIR run on J: ``report.json``, ``report.md`` and one self-contained
``gallery.html`` with J's perceptual evidence for its hallucinations.

The numbers come from :mod:`jmllm.joint.audit.benchmark_metrics` (POPE's and CHAIR's), the
gallery's cards and their pictures from :mod:`jmllm.joint.audit.benchmark_gallery`; this module
writes the files (:func:`write_benchmark_report`) and still exports every name of those parts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jmllm.align.options import markdown_text
from jmllm.joint.audit.benchmark import (
    BenchmarkResult,
    pope_answers,  # noqa: F401
)
from jmllm.joint.audit.benchmark_gallery import (
    DETECTION_MARGIN,  # noqa: F401
    MAX_CARD_OBJECTS,  # noqa: F401
    Card,
    _chair_cards,
    _chair_pictures,
    _pope_cards,
    _pope_pictures,
    get_template_name,  # noqa: F401
)
from jmllm.joint.audit.benchmark_metrics import (
    DEFAULT_OWL_THRESHOLD,
    ChairInputs,
    chair_report,
    chair_scores,
    pope_report,
)
from jmllm.joint.audit.metrics import auroc  # noqa: F401
from jmllm.joint.audit.report import GALLERY_HTML, PICTURES_DIR, REPORT_JSON, REPORT_MD
from jmllm.joint.render.pages import asset, environment
from jmllm.joint.render.report import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

CURVE_PNG = "first_token_curve.png"


@dataclass
class BenchmarkReport:
    """The written report: its metrics and files."""

    metrics: dict[str, Any]
    cards: list[Card]
    json_path: Path
    markdown_path: Path
    gallery_path: Path
    curve_path: Path | None = None


def curve_png(curve: dict[str, Any], splits: Sequence[str]) -> bytes:
    """The first-token rule's F1 and yes-ratio against its threshold, one line per split.

    Example:
        >>> curve_png({"thresholds": []}, [])[:4] == b"\\x89PNG"
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    thresholds = curve.get("thresholds", [])
    for i, metric in enumerate(("f1", "yes_ratio")):
        ax = fig.add_subplot(1, 2, i + 1)
        if not thresholds:
            ax.text(0.5, 0.5, "no first-token scores", ha="center", va="center")
        for split in [*splits, "mean"]:
            values = (
                [v if v is not None else float("nan") for v in curve[split][metric]]
                if thresholds
                else []
            )
            if values:
                style = "-" if split != "mean" else "--"
                ax.plot(thresholds, values, style, label=split)
        if thresholds:
            ax.axvline(0.0, color="#888", lw=0.8)
            ax.legend(fontsize=8)
        ax.set_xlabel("threshold on the first answer token's yes/no log-odds")
        ax.set_ylabel({"f1": "F1", "yes_ratio": "yes-ratio"}[metric])
        ax.set_title(f"First-token rule: {'F1' if metric == 'f1' else 'yes-ratio'}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _md_cell(text: Any) -> str:
    """File and model text in Markdown: HTML and Markdown escaped, one line, at most 200
    characters (:func:`jmllm.align.options.markdown_text`)."""
    return markdown_text(text, limit=200)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def _pope_tables(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One table per rule: rows of splits, mean and pooled."""
    from jmllm.joint.audit.pope import POPE_METRICS, POPE_RULES

    tables = []
    for rule in POPE_RULES:
        m = metrics["pope_rules"][rule]
        chosen = rule == metrics["parse_rule"]
        rows = []
        for key in [*metrics["pope_rows"], "mean", "pooled"]:
            row = m[key]
            n = row.get("n", "")
            cells = [_fmt(row[k]) for k in POPE_METRICS]
            if chosen:  # the report's rule: its intervals too
                ci = metrics["pope_ci"][key]
                cells = [
                    f"{c} {_interval(ci[k])}" for c, k in zip(cells, POPE_METRICS, strict=True)
                ]
            rows.append({"name": key, "n": n, "other": row.get("other", ""), "cells": cells})
        tables.append(
            {
                "rule": rule,
                "chosen": rule == metrics["parse_rule"],
                "rows": rows,
                "headline": m["headline"],
            }
        )
    return tables


def _interval(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[—]"


def _markdown(metrics: dict[str, Any], run: dict[str, Any], cards: list[Card]) -> str:
    from jmllm.joint.audit.pope import POPE_METRICS

    s = run["settings"]
    lines = [f"# Hallucination benchmark: {metrics['benchmark'].upper()}", ""]
    lines += [f"- {_md_cell(note)}" for note in run["notes"]]
    lines += [
        f"- model: {_md_cell(json.dumps(run['model']))}",
        f"- prompt: {_md_cell(s['question'])} in template {_md_cell(s['template'])}, greedy, at "
        f"most {s['max_new_tokens']} new tokens, vision `{s['vision']}`; OWL-ViT query "
        f"{_md_cell(s['query_template'])}",
        f"- images: {metrics['images']} answered ({run['images_failed']} could not be read)",
        "",
    ]
    if metrics["benchmark"] == "pope":
        lines += [
            "## Rows",
            "",
            "| split | file | rows | answered | SHA-256 |",
            "| --- | --- | --- | --- | --- |",
        ]
        for split, doc in metrics["pope_rows"].items():
            lines.append(
                f"| {split} | {_md_cell(doc['file'])} | {doc['rows']} | {doc['answered']} | "
                f"`{doc['sha256'][:16]}…` |"
            )
        for table in _pope_tables(metrics):
            mark = (
                " (the report's rule; bootstrap intervals over images)" if table["chosen"] else ""
            )
            h = table["headline"]
            lines += [
                "",
                f"## Rule `{table['rule']}`{mark}",
                "",
                f"Headline: F1 {_fmt(h['value'])} ({h['source']}).",
                "",
                "| rows | n | neither yes nor no | " + " | ".join(POPE_METRICS) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in POPE_METRICS) + " |",
            ]
            lines += [
                f"| {r['name']} | {r['n']} | {r['other']} | " + " | ".join(r["cells"]) + " |"
                for r in table["rows"]
            ]
        ft = metrics["first_token"]
        if ft.get("available"):
            best = ft["best_f1"]["mean"]
            lines += [
                "",
                f"First-token rule: AUROC of the yes/no log-odds for the truth "
                f"{_fmt(ft['auroc'])}; mean F1 at threshold {ft['threshold']}: "
                f"{_fmt(metrics['pope_rules']['first-token']['mean']['f1'])}; best mean F1 "
                f"{_fmt(best['f1'])} at {best['threshold']:.3f} (chosen on these rows: "
                "optimistic).",
                "",
                f"![first-token threshold curve]({_curve_name(metrics)})",
            ]
        lines += [
            "",
            "## Where the rules disagree",
            "",
            "| rules | rows | example answers |",
            "| --- | --- | --- |",
        ]
        for pair, d in metrics["rule_disagreements"].items():
            examples = "; ".join(repr(e) for e in d["examples"])
            lines.append(f"| {pair} | {d['rows']} | {_md_cell(examples)} |")
    else:
        c, ci = metrics["chair"], metrics["chair_ci"]
        sample = c.get("sample") or {}
        lines += [
            "## CHAIR",
            "",
            "| CHAIR_s | CHAIR_i | recall | captions | mentions | hallucinated mentions |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {_fmt(c['chair_s'])} {_interval(ci['chair_s'])} | {_fmt(c['chair_i'])} "
            f"{_interval(ci['chair_i'])} | {_fmt(c['recall'])} {_interval(ci['recall'])} | "
            f"{c['captions']} | {c['mentions']} | {c['hallucinated_mentions']} |",
            "",
            f"Synonyms: {_md_cell(c['synonyms'])}; truth: {c['truth']}; images: "
            f"{_md_cell(json.dumps(sample))}; {c['unfinished']} captions cut by the token limit.",
        ]
    pvl = metrics["perception_vs_language"]
    lines += [
        "",
        "## Perception or language?",
        "",
        f"Of J's {pvl['errors']} hallucinations with OWL-ViT evidence on the same `t` "
        f"(threshold {metrics['owl_threshold']}): perception {_fmt(pvl['perception'])} "
        f"(OWL-ViT already wrong), language {_fmt(pvl['language'])} (OWL-ViT right, the LLM "
        f"wrong); counts {pvl['counts']}.",
        "",
        f"AUROC of OWL-ViT's score for the truth: {_fmt(metrics['auroc_owl_predicts_truth'])}.",
        "",
        "## Gallery",
        "",
    ]
    if cards:
        lines += ["| # | image | title | side |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {c.rank} | `{_md_cell(c.file)}` | {_md_cell(c.title)} | {c.side} |" for c in cards
        ]
    else:
        lines.append("No hallucination to show.")
    return "\n".join(lines) + "\n"


def _curve_name(metrics: dict[str, Any]) -> str:
    return CURVE_PNG


def _gallery(
    metrics: dict[str, Any], run: dict[str, Any], cards: list[Card], curve: bytes | None
) -> str:
    """``templates/benchmark_gallery.html`` (autoescaped): every value is text; only the
    pictures' ``data:`` URLs are built here."""
    from jmllm.joint.audit.pope import POPE_METRICS
    from jmllm.joint.render.explanation import data_url

    context: dict[str, Any] = {
        "css": asset("audit_gallery.css"),
        "metrics": metrics,
        "run": run,
        "settings": run["settings"],
        "metric_names": POPE_METRICS,
        "cards": [
            {
                "card": c,
                "pictures": [(alt, data_url(png)) for alt, png in c.pictures],
            }
            for c in cards
        ],
        "curve": data_url(curve) if curve else None,
        "fmt": _fmt,
        "interval": _interval,
    }
    if metrics["benchmark"] == "pope":
        context["tables"] = _pope_tables(metrics)
    return environment().get_template("benchmark_gallery.html").render(**context)


def write_benchmark_report(
    result: BenchmarkResult,
    out: str | os.PathLike[str] | None = None,
    model: Any = None,
    *,
    pope: Any = None,
    chair: ChairInputs | None = None,
    rule: str = "llava",
    threshold: float = 0.0,
    owl_threshold: float = DEFAULT_OWL_THRESHOLD,
    top_k: int = 10,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    notes: Sequence[str] = (),
    progress: bool = False,
) -> BenchmarkReport:
    """Write a benchmark run's report into ``out`` (default the run's own folder).

    Args:
        result: from :func:`~jmllm.joint.audit.benchmark.run_benchmark`.
        out: the report folder.
        model: the :class:`~jmllm.joint.JointModel` that answered, for the gallery's pictures
            (None: the gallery lists the hallucinations without pictures).
        pope: the :class:`~jmllm.joint.audit.pope_files.PopeData` of a POPE run.
        chair: the :class:`~jmllm.joint.audit.benchmark_metrics.ChairInputs` of a CHAIR run.
        rule: POPE: the rule of ``pope`` (every rule is in ``pope_rules``).
        threshold: POPE: the first-token rule's threshold.
        owl_threshold: OWL-ViT "sees" an object at or above this score.
        top_k: hallucinations in the gallery.
        n_resamples, confidence, seed: the percentile bootstrap over images of the intervals.
        notes: short notices shown at the top.
        progress: a progress bar over the gallery's pictures.

    Returns:
        :class:`BenchmarkReport`.

    Example:
        >>> report = write_benchmark_report(result, model=model, pope=data)  # doctest: +SKIP
        >>> report.metrics["pope"]["mean"]["f1"]  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    folder = Path(out) if out is not None else result.out
    if folder is None:
        raise ValueError("out: the run was in memory; give a report folder")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    if (pope is None) == (chair is None):
        raise ValueError("give pope= for a POPE run or chair= for a CHAIR run")
    benchmark = result.settings.benchmark
    if (benchmark == "pope") != (pope is not None):
        raise ValueError(f"a {benchmark} run: give {'pope' if benchmark == 'pope' else 'chair'}=")
    if pope is not None:
        metrics = pope_report(
            pope, result, rule, threshold, owl_threshold, n_resamples, confidence, seed
        )
        cards = _pope_cards(pope, result, rule, threshold, owl_threshold, top_k)
    else:
        assert chair is not None
        metrics = chair_report(chair, result, owl_threshold, n_resamples, confidence, seed)
        cards = _chair_cards(metrics, result, top_k)
    sources = {image.image_id: image for image in result.images}
    pages: dict[int, str] = {}
    for card in tqdm(cards, desc="gallery", unit="pic", disable=not (progress and model)):
        if model is None:
            break
        try:
            image = sources[card.image_id].load()
            if pope is not None:
                _pope_pictures(model, result, card, image)
            else:
                page = _chair_pictures(model, result, card, image, owl_threshold)
                if page is not None:
                    pages[card.rank] = page
        except (OSError, ValueError) as exc:  # an image gone since the run: say so, go on
            card.error = f"no pictures: {' '.join(str(exc).split())}"
            logger.warning("%s: %s", card.file, card.error)
    folder.mkdir(parents=True, exist_ok=True)
    for card in cards:
        stem = f"{card.rank:02d}_{_slug(card.image_id)}"
        for k, (_, png) in enumerate(card.pictures):
            atomic_write_bytes(folder / PICTURES_DIR / f"{stem}_{k}.png", png)
        if card.rank in pages:
            card.page = f"{PICTURES_DIR}/{stem}.html"
            atomic_write_text(folder / card.page, pages[card.rank])
    run = {
        "settings": result.settings.to_dict(),
        "model": dict(getattr(model, "sources", {}) or {}) if model else {},
        "images_failed": len(result.failed),
        "failed": result.failed,
        "processed": result.processed,
        "kept": result.kept,
        "rows_per_batch": result.rows_per_batch,
        "seconds": round(result.seconds, 3),
        "notes": list(notes),
    }
    metrics["hallucinations"] = [c.to_json() for c in cards]
    metrics["run"] = run
    curve = None
    curve_path = None
    if pope is not None:
        curve = curve_png(metrics["first_token"], pope.splits)
        curve_path = atomic_write_bytes(folder / CURVE_PNG, curve)
    json_path = atomic_write_text(
        folder / REPORT_JSON, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    )
    md_path = atomic_write_text(folder / REPORT_MD, _markdown(metrics, run, cards))
    gallery = atomic_write_text(folder / GALLERY_HTML, _gallery(metrics, run, cards, curve))
    return BenchmarkReport(metrics, cards, json_path, md_path, gallery, curve_path)


__all__ = [
    "CURVE_PNG",
    "DEFAULT_OWL_THRESHOLD",
    "BenchmarkReport",
    "Card",
    "ChairInputs",
    "chair_report",
    "chair_scores",
    "curve_png",
    "pope_report",
    "write_benchmark_report",
]
