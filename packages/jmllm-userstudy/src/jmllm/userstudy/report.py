"""Write a :class:`~jmllm.userstudy.score.StudyScore` as Markdown, JSON and a bar chart PNG."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text
from .conventions import markdown_text
from .score import Rate, StudyScore

__all__ = ["markdown_report", "plot_per_question", "write_results"]

# Markdown punctuation to backslash-escape. Not "<", ">", "&": those are HTML-escaped first (and
# only those: quotes need no escaping outside attributes), and the entities that produces (&lt;
# &gt; &amp;) contain none of these characters, so nothing is escaped twice.


def _md(text: str) -> str:
    r"""Text safe in a Markdown table cell: ``<``, ``>``, ``&`` HTML-escaped, Markdown
    punctuation backslashed, control characters escaped, one line
    (:func:`jmllm.userstudy.conventions.markdown_text`).

    >>> print(_md("it's <b>x</b> | #1"))
    it's &lt;b&gt;x&lt;/b&gt; \| \#1
    """
    return markdown_text(text)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f}%"


def _ci(rate: Rate) -> str:
    return "n/a" if rate.total == 0 else f"{_pct(rate.ci_low)}–{_pct(rate.ci_high)}"


def markdown_report(score: StudyScore) -> str:
    """The results as Markdown: per question, overall, per participant, and files not scored.

    Args:
        score: The result of :func:`~jmllm.userstudy.score.score_answers`.

    Returns:
        Markdown text; every spec or participant string is escaped.

    >>> from jmllm.userstudy.score import QuestionScore, StudyScore
    >>> q = QuestionScore("q1", ("<b>cat</b>", "dog"), "A1", Rate.of(3, 4), None)
    >>> s = StudyScore("T", "f" * 64, 4, (q,), (), Rate.of(3, 4))
    >>> "&lt;b&gt;cat&lt;/b&gt;" in markdown_report(s)
    True
    """
    n_scored = len(score.participants)
    lines = [
        f"# Results: {_md(score.title)}",
        "",
        f"Spec fingerprint `{score.spec_fingerprint[:16]}`; {score.files_read} answer files read, "
        f"{n_scored} scored, {len(score.problems)} not scored. "
        "Intervals are Clopper-Pearson (exact) 95%.",
        "",
        "## Per question",
        "",
        "| Question | Objects | Correct answer | Correct | Share correct | 95% CI | Reference |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for q in score.questions:
        ref = "" if q.reference_share_correct is None else _pct(q.reference_share_correct)
        lines.append(
            f"| {_md(q.question_id)} | {_md(q.objects[0])} / {_md(q.objects[1])} | {q.correct_answer} "
            f"| {q.rate.correct} / {q.rate.total} | {_pct(q.rate.share)} | {_ci(q.rate)} | {ref} |"
        )
    o = score.overall
    lines.append(f"| **Overall** | | | {o.correct} / {o.total} | {_pct(o.share)} | {_ci(o)} | |")
    lines += ["", "## Per participant", ""]
    if score.participants:
        lines += [
            "| Participant | File | Correct | Share correct | 95% CI |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {_md(p.participant_id)} | {_md(p.file)} | {p.rate.correct} / {p.rate.total} "
            f"| {_pct(p.rate.share)} | {_ci(p.rate)} |"
            for p in score.participants
        ]
    else:
        lines.append("No submission could be scored.")
    lines += ["", "## Answer files not scored", ""]
    if score.problems:
        lines += ["| File | Participant | Problem | Detail |", "|---|---|---|---|"]
        lines += [
            f"| {_md(p.file)} | {_md(p.participant_id or '')} | {p.kind} | {_md(p.detail)} |"
            for p in score.problems
        ]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _mpl_text(text: str) -> str:
    """Matplotlib text that is shown literally (``$`` would start mathtext)."""
    return text.replace("$", r"\$")


def plot_per_question(score: StudyScore) -> bytes:
    """A bar chart of the share of correct answers per question (PNG bytes), with 95% intervals
    and, where the spec gives one, the reference rate as a marker.

    >>> from jmllm.userstudy.score import QuestionScore, StudyScore
    >>> q = QuestionScore("q1", ("cat", "dog"), "A1", Rate.of(3, 4), 1.0)
    >>> plot_per_question(StudyScore("T", "f" * 64, 4, (q,), (), Rate.of(3, 4)))[:4]
    b'\\x89PNG'
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot and no GUI backend

    n = len(score.questions)
    fig = Figure(figsize=(max(5.0, 1.3 * n + 1.5), 4.2), dpi=120)
    ax = fig.subplots()
    xs = list(range(n))
    shares = [0.0 if q.rate.total == 0 else 100 * q.rate.share for q in score.questions]
    err_low = [
        0.0 if q.rate.total == 0 else s - 100 * q.rate.ci_low
        for q, s in zip(score.questions, shares, strict=True)
    ]
    err_high = [
        0.0 if q.rate.total == 0 else 100 * q.rate.ci_high - s
        for q, s in zip(score.questions, shares, strict=True)
    ]
    ax.bar(xs, shares, color="#4a78c2", label="share correct")
    ax.errorbar(
        xs, shares, yerr=[err_low, err_high], fmt="none", ecolor="#222", capsize=4, label="95% CI"
    )
    refs = [
        (x, 100 * q.reference_share_correct)
        for x, q in zip(xs, score.questions, strict=True)
        if q.reference_share_correct is not None
    ]
    if refs:
        ax.scatter(
            [x for x, _ in refs],
            [r for _, r in refs],
            marker="D",
            color="#d0542c",
            zorder=3,
            label="reference",
        )
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [
            _mpl_text(
                f"{q.question_id}: {q.rate.correct}/{q.rate.total}\n{q.objects[0]}\n{q.objects[1]}"
            )
            for q in score.questions
        ],
        fontsize=8,
    )
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("correct answers (%)")
    ax.set_title(_mpl_text(f"{score.title}: {len(score.participants)} participants"), fontsize=10)
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_results(score: StudyScore, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` and ``per_question.png`` into ``out_dir``.

    Args:
        score: The result of :func:`~jmllm.userstudy.score.score_answers`.
        out_dir: Output folder (created if missing).

    Returns:
        The written paths by kind (``"markdown"``, ``"json"``, ``"chart"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "results.md",
        "json": out / "results.json",
        "chart": out / "per_question.png",
    }
    atomic_write_text(paths["markdown"], markdown_report(score))
    document = _jsonable(dataclasses.asdict(score))
    atomic_write_text(paths["json"], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    atomic_write_bytes(paths["chart"], plot_per_question(score))
    return paths
