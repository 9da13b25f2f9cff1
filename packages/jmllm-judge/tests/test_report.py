from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import wilcoxon

from jmllm.judge.report import (
    bootstrap_ci,
    build_report,
    markdown_cell,
    render_markdown,
    write_report,
)
from jmllm.judge.runner import JudgementRecord, RunResults, load_results, save_results

EVIL = '<script>alert("x")</script> | **bold** [link](http://e.x) `code`\nnext line & more'


def make_results(scores: dict[str, list[str | None]]) -> RunResults:
    """Results where ``scores[system][i]`` is the raw reply for image i (None: failed)."""
    records = []
    for system, replies in scores.items():
        for i, reply in enumerate(replies):
            records.append(
                JudgementRecord(
                    system=system,
                    image_id=str(i),
                    caption=f"{system} caption {i}" if i else EVIL,
                    key=f"{system}-{i}",
                    status="answered" if reply is not None else "failed",
                    reply=reply,
                    error=None if reply is not None else "HTTP 500: internal error",
                    attempts=1 if reply is not None else 8,
                    prompt_tokens=100 if reply is not None else None,
                    completion_tokens=1 if reply is not None else None,
                )
            )
    n = max(len(v) for v in scores.values())
    return RunResults(
        settings={"model": "judge", "base_url": None, "temperature": 0.0},
        systems=list(scores),
        records=records,
        n_images=n,
    )


def test_statistics_exclude_invalid_and_failed() -> None:
    a = ["7", "8", "6", "9", "seven", "11", None, "7"]
    b = ["5", "6", "6", "7", "4", "5", "6", None]
    report = build_report(make_results({"A": a, "B": b}), resamples=2000, score_parser="strict")
    sa, sb = report.systems
    valid_a = [7, 8, 6, 9, 7]
    assert (sa.valid, sa.invalid, sa.failed) == (5, 2, 1)
    assert sa.mean == pytest.approx(np.mean(valid_a)) and sa.std == pytest.approx(
        np.std(valid_a, ddof=1)
    )
    assert sa.ci_low is not None and sa.ci_high is not None and sa.ci_low <= sa.mean <= sa.ci_high
    assert (sb.valid, sb.invalid, sb.failed) == (7, 0, 1)
    assert sa.prompt_tokens == 700 and sa.completion_tokens == 7 and sa.usage_reported == 7

    (pair,) = report.pairs
    diffs = np.array([7 - 5, 8 - 6, 6 - 6, 9 - 7])  # images 0-3: both valid; 4-7 are not
    assert pair.n_pairs == 4 and pair.mean_diff == pytest.approx(diffs.mean())
    assert pair.wilcoxon_p == pytest.approx(wilcoxon(diffs).pvalue)
    assert (pair.a_higher, pair.b_higher, pair.ties) == (3, 0, 1)
    assert [r.reply for r in report.invalid] == ["seven", "11"]
    assert len(report.failed) == 2


def test_identical_systems_and_empty_systems() -> None:
    report = build_report(
        make_results({"A": ["5", "6", "7"], "B": ["5", "6", "7"], "C": ["x", None, "y"]})
    )
    ab, ac, _bc = report.pairs
    # every difference zero: the Wilcoxon test has nothing to rank, so no p-value (one convention
    # with jmllm.bias.stats; see tests/test_stats.py)
    assert ab.mean_diff == 0 and ab.wilcoxon_p is None and ab.ci_low == ab.ci_high == 0
    assert ac.n_pairs == 0 and ac.mean_diff is None and ac.wilcoxon_p is None
    c = report.systems[2]
    assert c.mean is None and c.std is None and c.ci_low is None and c.valid == 0
    json.dumps(report.to_json(), allow_nan=False)  # no NaN in the JSON
    render_markdown(report)


def test_bootstrap_ci_is_seeded_and_sane() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(1, 11, size=100)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    low, high = bootstrap_ci(x)  # type: ignore[misc]
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - 1.96 * se, abs=0.1) and high == pytest.approx(
        x.mean() + 1.96 * se, abs=0.1
    )
    assert bootstrap_ci([4]) is None


def test_model_text_cannot_break_the_markdown() -> None:
    cell = markdown_cell(EVIL)
    assert "<script>" not in cell and "&lt;script&gt;" in cell
    assert "\n" not in cell and "|" not in cell.replace("\\|", "")
    results = make_results({"A": [EVIL, "5"], EVIL: ["3", "4"]})
    markdown = render_markdown(build_report(results))
    assert "<script>" not in markdown and "**bold**" not in markdown
    # every table row is one line with the right number of cells
    for line in markdown.splitlines():
        if line.startswith("| A |") or line.startswith("| &lt;script"):
            assert line.replace("\\|", "").count("|") in (10, 11, 5, 6), line


def test_results_and_report_files(tmp_path: Path) -> None:
    results = make_results(
        {
            "COCO GT": ["7", "6", "8", "7"],
            "LLaVA": ["8", "7", "8", "oops"],
            "J": ["6", "5", None, "6"],
        }
    )
    path = save_results(tmp_path / "results.json", results)
    loaded = load_results(path)
    assert loaded.records == results.records and loaded.systems == results.systems
    paths = write_report(build_report(loaded), tmp_path / "report")
    with Image.open(paths["chart"]) as chart:
        assert chart.format == "PNG" and chart.size[0] > 300
    data = json.loads(paths["json"].read_text())
    assert [s["system"] for s in data["systems"]] == ["COCO GT", "LLaVA", "J"]
    assert (
        data["invalid"][0]["caption"] == results.records[7].caption
        and data["invalid"][0]["reply"] == "oops"
    )
    markdown = paths["markdown"].read_text()
    assert "| Model: | COCO GT | LLaVA | J |" in markdown
    assert "| Avg. score: | 7.0 | 7.7 | 5.7 |" in markdown


def test_authors_reader_is_the_default_and_disagreements_are_listed(tmp_path: Path) -> None:
    # The authors' script: score = int(reply), skipped when int() fails (Table 1).
    a = ["7", "7.", "11", "+7", " 8 ", "seven", None, "07"]
    results = make_results({"A": a})
    authors = build_report(results, resamples=200)
    strict = build_report(results, resamples=200, score_parser="strict")
    assert authors.score_parser == "authors" and strict.score_parser == "strict"
    by_int = []
    for reply in a:
        try:
            by_int.append(int(reply))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    assert by_int == [7, 11, 7, 8, 7]
    assert authors.systems[0].mean == pytest.approx(np.mean(by_int))
    assert (authors.systems[0].valid, authors.systems[0].invalid) == (5, 2)
    assert strict.systems[0].mean == pytest.approx(np.mean([7, 7, 8]))
    assert (strict.systems[0].valid, strict.systems[0].invalid) == (3, 4)
    # the same replies are disagreements whichever reader the report uses
    expected = {"7.", "11", "+7", "07"}
    for report in (authors, strict):
        assert {r.reply for r in report.reader_disagreements} == expected
    markdown = render_markdown(authors)
    assert "as the authors' script read them" in markdown
    assert "reads differently (4)" in markdown
    data = authors.to_json()
    assert data["score_parser"] == "authors"
    rows = {r["reply"]: r for r in data["reader_disagreements"]}
    assert (rows["11"]["score_authors"], rows["11"]["score_strict"]) == (11, None)
    assert (rows["7."]["score_authors"], rows["7."]["score_strict"]) == (None, 7)
    with pytest.raises(ValueError, match="score parser: unknown 'lenient'"):
        build_report(results, score_parser="lenient")
