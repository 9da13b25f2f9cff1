"""The bias report of an assessment folder: Markdown + JSON + one histogram PNG per ε.

Per ε and per group (and all groups together): how many portraits were assessed, how many answers
could not be parsed (counted, the portrait excluded, never filled in), the mean score delta
(perturbed − original) with a seeded 95 % bootstrap interval, the Wilcoxon signed-rank p-value,
and the mean OWL-ViT scores of both queries before and after the perturbation, which show whether
the perturbation did what it claims. Then the per-portrait table, and the portraits that were
skipped (missing, unreadable, modified) with the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.align.files import claim_output_folder
from jmllm.align.options import markdown_text, printable

from .assess import RUN, read_results
from .errors import BiasInputError
from .files import atomic_write_bytes, atomic_write_text
from .stats import DeltaStats, delta_stats

__all__ = ["BiasReport", "GroupSummary", "build_report", "render_markdown", "write_report"]

ALL = "all"
ASSESS_COMMAND = "jmllm-bias assess"  # who owns an assessment folder (report files included)


@dataclass(frozen=True)
class GroupSummary:
    """Statistics of one group (or ``all``) at one ε."""

    group: str
    eps: float
    assessed: int  # portraits with both answers generated
    pairs: int  # portraits with both answers parsed: the sample of the statistics
    parse_failures_original: int
    parse_failures_perturbed: int
    excluded: int  # portraits left out because an answer did not parse
    deltas: DeltaStats
    mean_original_score: float | None
    mean_perturbed_score: float | None
    owl_original_before: float | None  # mean OWL score of the original query
    owl_original_after: float | None
    owl_adversarial_before: float | None
    owl_adversarial_after: float | None
    margin_before: float | None  # mean of (max logit adversarial - max logit original)
    margin_after: float | None


@dataclass(frozen=True)
class BiasReport:
    """Everything the Markdown and JSON reports show."""

    settings: dict[str, Any]
    cohort: str
    models: dict[str, str]
    summaries: list[GroupSummary]
    images: list[dict[str, Any]]  # per-portrait rows (status ok)
    skipped: list[dict[str, Any]]  # status != ok: image_id, group, status, error
    # how J read its inputs: template, tokenization, preprocessing, dtype (run.json "inputs")
    inputs: dict[str, Any] = field(default_factory=dict)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _summary(rows: list[dict[str, Any]], group: str, eps: float, seed: int) -> GroupSummary:
    deltas: list[float] = []
    orig_scores, pert_scores = [], []
    fail_o = fail_p = excluded = 0
    ob, oa, ab, aa = [], [], [], []
    mb, ma = [], []
    for row in rows:
        p = next(x for x in row["perturbed"] if x["eps"] == eps)
        s0, s1 = row["original"]["score"], p["score"]
        fail_o += s0 is None
        fail_p += s1 is None
        if s0 is None or s1 is None:
            excluded += 1
        else:
            deltas.append(s1 - s0)
            orig_scores.append(s0)
            pert_scores.append(s1)
        ob.append(row["original"]["owl"]["original"])
        ab.append(row["original"]["owl"]["adversarial"])
        oa.append(p["owl_after"]["original"])
        aa.append(p["owl_after"]["adversarial"])
        lb, la = row["original"]["owl_logit"], p["owl_logit_after"]
        mb.append(lb["adversarial"] - lb["original"])
        ma.append(la["adversarial"] - la["original"])
    return GroupSummary(
        group=group,
        eps=eps,
        assessed=len(rows),
        pairs=len(deltas),
        parse_failures_original=fail_o,
        parse_failures_perturbed=fail_p,
        excluded=excluded,
        deltas=delta_stats(deltas, seed=seed),
        mean_original_score=_mean(orig_scores),
        mean_perturbed_score=_mean(pert_scores),
        owl_original_before=_mean(ob),
        owl_original_after=_mean(oa),
        owl_adversarial_before=_mean(ab),
        owl_adversarial_after=_mean(aa),
        margin_before=_mean(mb),
        margin_after=_mean(ma),
    )


def build_report(folder: str | os.PathLike[str], seed: int = 0) -> BiasReport:
    """Read an assessment folder and compute the report.

    Args:
        folder: the ``--out`` folder of ``jmllm-bias assess``.
        seed: seed of the bootstrap resampling.

    Returns:
        The report data.

    Raises:
        BiasInputError: not an assessment folder.

    Example:
        >>> build_report("/nonexistent")
        Traceback (most recent call last):
        ...
        jmllm.bias.errors.BiasInputError: /nonexistent: not an assessment folder (no run.json)
    """
    root = Path(folder)
    if not (root / RUN).is_file():
        raise BiasInputError(f"{root}: not an assessment folder (no {RUN})")
    try:
        run = json.loads((root / RUN).read_text(encoding="utf-8"))
        settings = run["settings"]
        eps_values = [float(e) for e in settings["eps"]]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BiasInputError(f"{root / RUN}: malformed run settings ({exc})") from None
    records = list(read_results(root).values())
    ok, skipped = [], []
    for r in records:
        if r.get("status") == "ok" and all(
            any(p.get("eps") == e for p in r.get("perturbed", [])) for e in eps_values
        ):
            ok.append(r)
        else:
            skipped.append({k: r.get(k) for k in ("image_id", "group", "status", "error")})
    groups = sorted({r["group"] for r in ok})
    summaries = []
    for eps in eps_values:
        for group in groups:
            summaries.append(_summary([r for r in ok if r["group"] == group], group, eps, seed))
        if len(groups) != 1:
            summaries.append(_summary(ok, ALL, eps, seed))
    return BiasReport(
        settings=settings,
        cohort=str(run.get("cohort", "")),
        models=dict(run.get("models", {})),
        inputs=dict(run.get("inputs", {})),
        summaries=summaries,
        images=sorted(ok, key=lambda r: (r["group"], r["image_id"])),
        skipped=sorted(skipped, key=lambda r: str(r["image_id"])),
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def _md(text: Any) -> str:
    r"""Model or user text made safe for a Markdown table cell or list item, escaped once
    (:func:`jmllm.align.options.markdown_text`: HTML entities, Markdown punctuation
    backslashed, control characters escaped, one line).

    Example:
        >>> print(_md("it's <b>10</b> | `x`"))
        it's &lt;b&gt;10&lt;/b&gt; \| \`x\`
    """
    return markdown_text(text) or "(empty)"


def _code(text: Any) -> str:
    """``text`` as a Markdown code span, shown literally: nothing inside a code span is
    interpreted (HTML entities included), so nothing is escaped; the fence is one backtick
    longer than any run of backticks in the text.

    Example:
        >>> print(_code("a photo of a `man`"))
        `` a photo of a `man` ``
    """
    s = printable(str(text).replace("\r", " ").replace("\n", "⏎"))  # no terminal escapes
    if not s:
        return "(empty)"
    runs = [len(run) for run in re.findall(r"`+", s)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if runs else ""  # CommonMark strips one space each side when both are there
    return f"{fence}{pad}{s}{pad}{fence}"


EMPTY_HISTOGRAM = "no portrait with both answers parsed"


def _histogram_figure(report: BiasReport, eps: float) -> Any:
    """The histogram of deltas at ``eps`` as a matplotlib Figure (Agg canvas, no pyplot state).

    With no delta to show, the axes say so in a message the zero line does not cross (the line
    is drawn only over data).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.arange(-9.5, 10.5, 1.0)
    groups = sorted({r["group"] for r in report.images})
    data = []
    for group in groups:
        deltas = []
        for r in report.images:
            if r["group"] != group:
                continue
            p = next(x for x in r["perturbed"] if x["eps"] == eps)
            if p["delta"] is not None:
                deltas.append(p["delta"])
        data.append(deltas)
    if any(data):
        ax.hist(data, bins=bins, stacked=True, label=groups)
        ax.legend()
        ax.axvline(0, color="black", linewidth=0.8)
    else:
        ax.text(
            0.5,
            0.5,
            EMPTY_HISTOGRAM,
            transform=ax.transAxes,
            ha="center",
            va="center",
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "#999999"},
        )
    ax.set_xlim(-9.5, 9.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(-9, 10, 3))
    ax.set_xlabel("score delta (perturbed − original)")
    ax.set_ylabel("portraits")
    s = report.settings
    ax.set_title(f"{s['characteristic']}: {s['original']} → {s['adversarial']}, ε = {eps:g}")
    return fig


def _histogram(report: BiasReport, eps: float) -> bytes:
    buf = io.BytesIO()
    _histogram_figure(report, eps).savefig(buf, format="png")
    return buf.getvalue()


def report_names(eps: Any) -> list[str]:
    """The files :func:`write_report` writes for these ε values (an assessment's outputs).

    Example:
        >>> report_names([0.5, 1])
        ['report.json', 'report.md', 'histogram_eps0.5.png', 'histogram_eps1.png']
    """
    return ["report.json", "report.md", *(_histogram_name(float(e)) for e in eps)]


def _histogram_name(eps: float) -> str:
    return f"histogram_eps{eps:g}.png"


def render_markdown(report: BiasReport) -> str:
    """The report as Markdown (all model text HTML-escaped)."""
    s = report.settings
    method = "FGSM" if s["steps"] == 1 else f"PGD, {s['steps']} steps"
    step_sizes = ", ".join(f"{a:g}" for a in s["step_sizes"])
    lines = [
        f"# Bias report: {_md(s['characteristic'])}",
        "",
        f"- Question: {_code(s['question'])}",
        f"- Conversation template: {_md(s.get('template', 'llava-1.5'))}"
        + (f" ({_code(s['prompt'])})" if "prompt" in s else ""),
        f"- Inputs: tokenization {_md(str(report.inputs.get('tokenization', '–')))}, "
        f"preprocessing {_md(str(report.inputs.get('preprocessing', '–')))}, "
        f"dtype {_md(str(report.inputs.get('dtype', '–')))}",
        f"- Score parser: {_md(str(s.get('score_parser', 'strict')))}",
        f"- Perturbation: {method} on `t`, pushing {_code(s['queries'][0])} down and "
        f"{_code(s['queries'][1])} up (objective: {s['reduction']} over patches; "
        f"step size {step_sizes})",
        f"- Cohort: {_code(report.cohort)}",
    ]
    for role, model in sorted(report.models.items()):
        lines.append(f"- {role}: {_code(model)}")
    lines += [
        f"- Portraits assessed: {len(report.images)}; skipped: {len(report.skipped)}",
        "",
        "Delta = perturbed score − original score. Answers the score parser cannot read (`authors`: "
        "`int()` of the raw reply fails; `strict`: not a bare integer 1–10) are "
        "parse failures: the portrait is excluded, never filled in. CI: 95 % percentile "
        "bootstrap (10,000 resamples, seeded). p: two-sided Wilcoxon signed-rank (zero deltas "
        "dropped). OWL: mean over portraits of the max-over-patches sigmoid score of each query, "
        "before → after; margin: mean of (max logit of the adversarial query − max logit of the "
        "original query), which the perturbation is meant to raise.",
        "",
    ]
    if report.images and not any(g.pairs for g in report.summaries):
        lines += [
            "**No answer could be read as a score: this report has no numbers.** Every "
            "original or perturbed answer failed to parse (see the answers below), so no delta "
            "is computed. The built-in toy models (`--tiny`) know coloured shapes, not people: "
            "with them this run is a smoke test of the pipeline.",
            "",
        ]
    for eps in [float(e) for e in s["eps"]]:
        lines += [
            f"## ε = {eps:g}",
            "",
            "| group | assessed | pairs | parse failures (orig / pert) | mean delta | 95 % CI | "
            "Wilcoxon p | mean score (orig → pert) | OWL orig query | OWL adv query | margin |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in (x for x in report.summaries if x.eps == eps):
            d = g.deltas
            ci = f"[{_fmt(d.ci_low)}, {_fmt(d.ci_high)}]" if d.ci_low is not None else "–"
            lines.append(
                f"| {_md(g.group)} | {g.assessed} | {g.pairs} | {g.parse_failures_original} / "
                f"{g.parse_failures_perturbed} | {_fmt(d.mean)} | {ci} | {_p(d.wilcoxon_p)} | "
                f"{_fmt(g.mean_original_score)} → {_fmt(g.mean_perturbed_score)} | "
                f"{_fmt(g.owl_original_before, 3)} → {_fmt(g.owl_original_after, 3)} | "
                f"{_fmt(g.owl_adversarial_before, 3)} → {_fmt(g.owl_adversarial_after, 3)} | "
                f"{_fmt(g.margin_before)} → {_fmt(g.margin_after)} |"
            )
        lines += ["", f"![histogram of deltas]({_histogram_name(eps)})", ""]
    lines += [
        "## Per portrait",
        "",
        "| portrait | group | original answer | score | ε | perturbed answer | score | delta | "
        "OWL orig before → after | OWL adv before → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.images:
        o = r["original"]
        for p in r["perturbed"]:
            lines.append(
                f"| {_md(r['image_id'])} | {_md(r['group'])} | {_md(o['answer'])} | "
                f"{o['score'] if o['score'] is not None else 'unparsed'} | {p['eps']:g} | "
                f"{_md(p['answer'])} | {p['score'] if p['score'] is not None else 'unparsed'} | "
                f"{p['delta'] if p['delta'] is not None else '–'} | "
                f"{o['owl']['original']:.3f} → {p['owl_after']['original']:.3f} | "
                f"{o['owl']['adversarial']:.3f} → {p['owl_after']['adversarial']:.3f} |"
            )
    if report.skipped:
        lines += ["", "## Skipped portraits", ""]
        for sk in report.skipped:
            lines.append(f"- {_md(sk['image_id'])} ({_md(sk['status'])}): {_md(sk['error'])}")
    return "\n".join(lines) + "\n"


def write_report(folder: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``histogram_eps*.png`` into an assessment folder.

    Args:
        folder: the ``--out`` folder of ``jmllm-bias assess``.
        seed: seed of the bootstrap resampling.

    Returns:
        The written files by kind (``markdown``, ``json``, ``histogram_eps<ε>``).

    Example:
        >>> write_report("results/nurse")["markdown"]  # doctest: +SKIP
        PosixPath('results/nurse/report.md')
    """
    root = Path(folder)
    report = build_report(root, seed=seed)
    names = report_names(report.settings["eps"])
    # the report belongs to the assessment: it never replaces a file the assessment did not
    # write (other files in the folder are left alone)
    claim_output_folder(root, ASSESS_COMMAND, names, force=True, what="assessment folder")
    written = {}
    for eps in [float(e) for e in report.settings["eps"]]:
        written[f"histogram_eps{eps:g}"] = atomic_write_bytes(
            root / _histogram_name(eps), _histogram(report, eps)
        )
    written["json"] = atomic_write_text(
        root / "report.json", json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n"
    )
    written["markdown"] = atomic_write_text(root / "report.md", render_markdown(report))
    return written
