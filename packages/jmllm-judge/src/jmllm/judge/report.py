"""Step 4: the Table 1 report — per-system scores with uncertainty, and paired comparisons.

From a :class:`~jmllm.judge.runner.RunResults`:

* per system (the supplementary's Table 1 layout, one column per system): mean score, standard
  deviation (ddof=1), 95% percentile-bootstrap CI of the mean, and the counts of valid, invalid
  (answered, but not a bare 1–10 integer) and failed (never answered) judgements. Only valid scores
  enter the statistics;
* for every pair of systems, on the images where both have a valid score: the mean paired
  difference A − B with its bootstrap CI, and the Wilcoxon signed-rank p-value (two-sided,
  ``scipy.stats.wilcoxon``, zero differences dropped; none when every difference is zero), both
  from :mod:`jmllm.judge.stats`;
* token usage in and out per system, where the server reported it;
* every invalid reply, raw, and every failure, with its error;
* which score reader was used (``authors``, the default, or ``strict``: see
  :mod:`jmllm.judge.parsing`) and every reply the two readers read differently.

Written as Markdown (all model text and names escaped), JSON, and a bar chart with CIs (PNG).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.judge.conventions import markdown_text
from jmllm.judge.files import atomic_write_bytes, atomic_write_text
from jmllm.judge.parsing import DEFAULT_SCORE_PARSER, SCORE_PARSERS
from jmllm.judge.runner import JudgementRecord, RunResults
from jmllm.judge.stats import bootstrap_ci, wilcoxon_p

__all__ = [
    "REPORT_FILES",
    "JudgeReport",
    "PairComparison",
    "SystemSummary",
    "bootstrap_ci",
    "build_report",
    "markdown_cell",
    "render_chart",
    "render_markdown",
    "write_report",
]

REPORT_FORMAT = "jmllm-judge/report"


@dataclass(frozen=True)
class SystemSummary:
    """One column of Table 1."""

    system: str
    n_images: int
    valid: int
    invalid: int
    failed: int  # no reply after every retry
    pending: int  # never sent (the run was interrupted)
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    prompt_tokens: int | None  # None when the server reported no usage
    completion_tokens: int | None
    usage_reported: int  # judgements whose reply carried usage


@dataclass(frozen=True)
class PairComparison:
    """System A against system B on the images where both have a valid score."""

    a: str
    b: str
    n_pairs: int
    mean_diff: float | None  # mean of (A − B)
    ci_low: float | None
    ci_high: float | None
    wilcoxon_p: float | None
    a_higher: int
    b_higher: int
    ties: int


@dataclass
class JudgeReport:
    settings: dict[str, Any]
    n_images: int
    systems: list[SystemSummary]
    pairs: list[PairComparison]
    invalid: list[JudgementRecord]
    failed: list[JudgementRecord]  # failed or pending
    total_prompt_tokens: int | None  # over distinct requests (a shared judgement counts once)
    total_completion_tokens: int | None
    bootstrap: dict[str, Any] = field(default_factory=dict)
    score_parser: str = DEFAULT_SCORE_PARSER
    # answered replies that the other reader scores differently (or accepts when this one refuses)
    reader_disagreements: list[JudgementRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def record(r: JudgementRecord) -> dict[str, Any]:
            return {**asdict(r), "score": r.score}

        def disagreement(r: JudgementRecord) -> dict[str, Any]:
            return {**record(r), **{f"score_{name}": r.score_as(name) for name in SCORE_PARSERS}}

        return _finite(
            {
                "format": REPORT_FORMAT,
                "version": 1,
                "settings": self.settings,
                "n_images": self.n_images,
                "score_parser": self.score_parser,
                "bootstrap": self.bootstrap,
                "systems": [asdict(s) for s in self.systems],
                "pairs": [asdict(p) for p in self.pairs],
                "tokens": {
                    "prompt": self.total_prompt_tokens,
                    "completion": self.total_completion_tokens,
                },
                "invalid": [record(r) for r in self.invalid],
                "failed": [record(r) for r in self.failed],
                "reader_disagreements": [disagreement(r) for r in self.reader_disagreements],
            }
        )


def _finite(value: Any) -> Any:
    """JSON has no NaN: replace non-finite floats with null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def build_report(
    results: RunResults,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    score_parser: str = DEFAULT_SCORE_PARSER,
) -> JudgeReport:
    """Compute the report of a run (deterministic for a given ``seed``).

    Args:
        results: the judgements (:func:`jmllm.judge.runner.load_results`).
        resamples: bootstrap resamples.
        level: confidence level of the intervals.
        seed: bootstrap seed.
        score_parser: how replies become scores: ``"authors"`` (``int(reply)``, what produced
            Table 1; default) or ``"strict"`` (a bare 1–10 integer). See
            :mod:`jmllm.judge.parsing`.

    Example:
        >>> report = build_report(load_results("results.json"), score_parser="strict")  # doctest: +SKIP
        >>> [(s.system, s.mean) for s in report.systems]  # doctest: +SKIP
    """
    if score_parser not in SCORE_PARSERS:
        raise ValueError(
            f"score parser: unknown {score_parser!r} (known: {', '.join(SCORE_PARSERS)})"
        )
    records_read = [replace(r, score_parser=score_parser) for r in results.records]
    by_system: dict[str, dict[str, JudgementRecord]] = {s: {} for s in results.systems}
    for r in records_read:
        by_system.setdefault(r.system, {})[r.image_id] = r

    summaries = []
    for system, records in by_system.items():
        scores = np.array(
            [r.score for r in records.values() if r.score is not None], dtype=np.float64
        )
        ci = bootstrap_ci(scores, resamples=resamples, level=level, seed=seed)
        usage = [
            r
            for r in records.values()
            if r.prompt_tokens is not None or r.completion_tokens is not None
        ]
        summaries.append(
            SystemSummary(
                system=system,
                n_images=len(records),
                valid=int(scores.size),
                invalid=sum(r.invalid for r in records.values()),
                failed=sum(r.status == "failed" for r in records.values()),
                pending=sum(r.status == "pending" for r in records.values()),
                mean=float(scores.mean()) if scores.size else None,
                std=float(scores.std(ddof=1)) if scores.size > 1 else None,
                ci_low=ci[0] if ci else None,
                ci_high=ci[1] if ci else None,
                prompt_tokens=sum(r.prompt_tokens or 0 for r in usage) if usage else None,
                completion_tokens=sum(r.completion_tokens or 0 for r in usage) if usage else None,
                usage_reported=len(usage),
            )
        )

    pairs = []
    for a, b in combinations(list(by_system), 2):
        diffs = np.array(
            [
                score_a - score_b
                for image_id, ra in by_system[a].items()
                if (score_a := ra.score) is not None
                and image_id in by_system[b]
                and (score_b := by_system[b][image_id].score) is not None
            ],
            dtype=np.float64,
        )
        ci = bootstrap_ci(diffs, resamples=resamples, level=level, seed=seed)
        pairs.append(
            PairComparison(
                a=a,
                b=b,
                n_pairs=int(diffs.size),
                mean_diff=float(diffs.mean()) if diffs.size else None,
                ci_low=ci[0] if ci else None,
                ci_high=ci[1] if ci else None,
                wilcoxon_p=wilcoxon_p(diffs),
                a_higher=int((diffs > 0).sum()),
                b_higher=int((diffs < 0).sum()),
                ties=int((diffs == 0).sum()),
            )
        )

    distinct: dict[str, JudgementRecord] = {r.key: r for r in records_read}
    with_usage = [
        r
        for r in distinct.values()
        if r.prompt_tokens is not None or r.completion_tokens is not None
    ]
    return JudgeReport(
        settings=results.settings,
        n_images=results.n_images,
        systems=summaries,
        pairs=pairs,
        invalid=[r for r in records_read if r.invalid],
        failed=[r for r in records_read if r.status in ("failed", "pending")],
        total_prompt_tokens=sum(r.prompt_tokens or 0 for r in with_usage) if with_usage else None,
        total_completion_tokens=sum(r.completion_tokens or 0 for r in with_usage)
        if with_usage
        else None,
        bootstrap={"method": "percentile", "resamples": resamples, "level": level, "seed": seed},
        score_parser=score_parser,
        reader_disagreements=[
            r
            for r in records_read
            if r.status == "answered" and len({r.score_as(name) for name in SCORE_PARSERS}) > 1
        ],
    )


# Markdown punctuation to backslash-escape. Not "<", ">", "&": those are HTML-escaped first, and
# the entities that produces (&lt; &gt; &amp;) contain none of these characters.


def markdown_cell(text: object, limit: int | None = 500) -> str:
    """``text`` safe inside a Markdown table cell: HTML-escaped, Markdown punctuation
    backslash-escaped, control characters escaped, line breaks shown as ``⏎``, cut at
    ``limit`` characters (:func:`jmllm.judge.conventions.markdown_text`)."""
    return markdown_text(text, limit)


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def _ci(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"[{low:.2f}, {high:.2f}]"


def _tokens(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


_SCORE_READERS = {
    "authors": "as the authors' script read them (`int(reply)`)",
    "strict": "strictly (a bare integer from 1 to 10)",
}


def _prompt_source(settings: dict[str, Any]) -> str:
    """Which judge prompts a run used, in words."""
    from jmllm.judge.prompts import JUDGE_SYSTEM_PROMPT, JUDGE_USER_PROMPTS

    user = settings.get("user_prompt_template")
    system = settings.get("system_prompt")
    if system != JUDGE_SYSTEM_PROMPT:
        return "custom system prompt"
    if user == JUDGE_USER_PROMPTS["authors"]:
        return "the paper's prompts as the authors' script sent them (caption in double quotes)"
    if user == JUDGE_USER_PROMPTS["supplementary"]:
        return "the paper's prompts as the supplementary §1.1 prints them (caption bare)"
    return "the paper's system prompt and a custom user prompt"


def render_markdown(report: JudgeReport) -> str:
    """The report as Markdown."""
    settings = report.settings
    level = round(100 * float(report.bootstrap.get("level", 0.95)))
    out = ["# Judge report", ""]
    out.append(
        f"Judge `{markdown_cell(settings.get('model'))}` at {markdown_cell(settings.get('base_url') or 'the default OpenAI URL')}, "
        f"temperature {settings.get('temperature')}, {report.n_images} images; {_prompt_source(settings)}. "
        f"Scores read {_SCORE_READERS.get(report.score_parser, report.score_parser)}. "
        "Invalid replies and failures are excluded from every statistic and listed below."
    )
    out += ["", "## Table 1: average judge score (1–10)", ""]
    names = [markdown_cell(s.system) for s in report.systems]
    out.append("| Model: | " + " | ".join(names) + " |")
    out.append("| --- |" + " --- |" * len(names))
    out.append("| Avg. score: | " + " | ".join(_num(s.mean, 1) for s in report.systems) + " |")

    out += ["", "## Per system", ""]
    out.append(
        f"| System | Mean | Std | {level}% CI | Valid | Invalid | Failed | Tokens in | Tokens out |"
    )
    out.append("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for s in report.systems:
        failed = s.failed + s.pending
        out.append(
            f"| {markdown_cell(s.system)} | {_num(s.mean)} | {_num(s.std)} | {_ci(s.ci_low, s.ci_high)} | "
            f"{s.valid} | {s.invalid} | {failed} | {_tokens(s.prompt_tokens)} | {_tokens(s.completion_tokens)} |"
        )
    if report.total_prompt_tokens is not None:
        out += [
            "",
            f"Tokens over distinct requests: {_tokens(report.total_prompt_tokens)} in, "
            f"{_tokens(report.total_completion_tokens)} out (as reported by the server).",
        ]
    else:
        out += ["", "The server reported no token usage."]

    if report.pairs:
        out += ["", "## Pairwise comparisons (same images, both valid)", ""]
        out.append(
            f"| A | B | Images | Mean A − B | {level}% CI | Wilcoxon p | A higher | B higher | Ties |"
        )
        out.append("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
        for p in report.pairs:
            out.append(
                f"| {markdown_cell(p.a)} | {markdown_cell(p.b)} | {p.n_pairs} | {_num(p.mean_diff)} | "
                f"{_ci(p.ci_low, p.ci_high)} | {_p(p.wilcoxon_p)} | {p.a_higher} | {p.b_higher} | {p.ties} |"
            )

    out += ["", f"## Invalid replies ({len(report.invalid)})", ""]
    if report.invalid:
        out.append("| System | Image | Raw reply | Caption |")
        out.append("| --- | --- | --- | --- |")
        for r in report.invalid:
            out.append(
                f"| {markdown_cell(r.system)} | {markdown_cell(r.image_id)} | {markdown_cell(repr(r.reply))} | "
                f"{markdown_cell(r.caption, 200)} |"
            )
    else:
        out.append("None.")
    other = [name for name in SCORE_PARSERS if name != report.score_parser]
    out += [
        "",
        f"## Replies the `{'`/`'.join(other)}` reader reads differently ({len(report.reader_disagreements)})",
        "",
    ]
    if report.reader_disagreements:
        out.append("| System | Image | Raw reply | " + " | ".join(SCORE_PARSERS) + " |")
        out.append("| --- | --- | --- |" + " ---: |" * len(SCORE_PARSERS))
        for r in report.reader_disagreements:
            read = " | ".join(_num(r.score_as(name), 0) for name in SCORE_PARSERS)
            out.append(
                f"| {markdown_cell(r.system)} | {markdown_cell(r.image_id)} | {markdown_cell(repr(r.reply))} | {read} |"
            )
    else:
        out.append("None: both readers give the same scores.")
    out += ["", f"## Failed or missing judgements ({len(report.failed)})", ""]
    if report.failed:
        out.append("| System | Image | Status | Attempts | Error |")
        out.append("| --- | --- | --- | ---: | --- |")
        for r in report.failed:
            error = r.error if r.status == "failed" else "not sent yet: run `jmllm-judge run` again"
            out.append(
                f"| {markdown_cell(r.system)} | {markdown_cell(r.image_id)} | {r.status} | {r.attempts} | "
                f"{markdown_cell(error)} |"
            )
    else:
        out.append("None.")
    out += [
        "",
        f"Means exclude invalid and failed judgements. CIs: {report.bootstrap.get('method')} bootstrap of "
        f"the mean, {report.bootstrap.get('resamples')} resamples, seed {report.bootstrap.get('seed')}. "
        "Wilcoxon: two-sided signed-rank test on the paired differences, zero differences dropped.",
        "",
    ]
    return "\n".join(out)


def render_chart(report: JudgeReport) -> bytes:
    """Bar chart of the mean score per system with its CI, as PNG bytes (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = report.systems
    fig = Figure(figsize=(max(4.0, 1.3 * len(systems) + 1.5), 3.6), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = np.arange(len(systems))
    means = np.array([s.mean if s.mean is not None else np.nan for s in systems])
    low = np.array(
        [s.mean - s.ci_low if s.mean is not None and s.ci_low is not None else 0.0 for s in systems]
    )
    high = np.array(
        [
            s.ci_high - s.mean if s.mean is not None and s.ci_high is not None else 0.0
            for s in systems
        ]
    )
    ax.bar(
        xs,
        np.nan_to_num(means),
        yerr=np.vstack([low, high]),
        capsize=5,
        color="#4C72B0",
        alpha=0.85,
    )
    for x, s in zip(xs, systems, strict=True):
        label = "no valid score" if s.mean is None else f"{s.mean:.1f}"
        ax.text(
            x,
            0.15,
            label,
            ha="center",
            va="bottom",
            color="white" if s.mean else "black",
            fontsize=8,
        )
    # One line, at most 24 characters; "$" would switch matplotlib to mathtext.
    labels = [" ".join(s.system.split()) for s in systems]
    labels = [(name if len(name) <= 24 else name[:23] + "…").replace("$", r"\$") for name in labels]
    tilt = len(systems) > 4 or max((len(label) for label in labels), default=0) > 12
    ax.set_xticks(xs, labels, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("judge score (1–10)")
    level = round(100 * float(report.bootstrap.get("level", 0.95)))
    ax.set_title(
        f"Mean judge score, {level}% bootstrap CI (n = {report.n_images} images)", fontsize=9
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


REPORT_FILES = ("report.md", "report.json", "scores.png")  # what write_report writes


def write_report(report: JudgeReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``scores.png`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    return {
        "markdown": atomic_write_text(out_dir / "report.md", render_markdown(report)),
        "json": atomic_write_text(
            out_dir / "report.json",
            json.dumps(report.to_json(), ensure_ascii=False, indent=1) + "\n",
        ),
        "chart": atomic_write_bytes(out_dir / "scores.png", render_chart(report)),
    }
