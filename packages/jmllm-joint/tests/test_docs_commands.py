"""The documented offline commands run as written: the Markdown is the source of truth.

Every fenced ``bash`` block of the repository's Markdown (``README.md``, ``docs/*.md``,
``packages/*/README.md``) that follows a ``<!-- test: offline -->`` line is executed, command by
command (a line ending in ``\\`` continues on the next), in a fresh folder per page, blocks in
page order, with the Hub switched off. A command that fails, or that names an option the code no
longer has, fails this test with the command and its stderr.

Then the figures the page states that its own commands produce are computed from their outputs
and compared with the page (:data:`FIGURES`): what ``describe`` answers, what the hallucination
view flags, every number of the toy audit's table, the gallery's most confident hallucination.

These end-to-end runs take minutes of CPU: they are marked ``slow`` (the ``slow`` nox session).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MARKER = "<!-- test: offline -->"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


def marked_blocks(text: str) -> list[list[str]]:
    """The commands of each marked block of a Markdown text, continuations joined."""
    blocks = []
    pattern = re.compile(re.escape(MARKER) + r"\s*\n```(?:bash|sh|console)?\n(.*?)\n```", re.S)
    for match in pattern.finditer(text):
        commands, pending = [], ""
        for line in match.group(1).splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
        blocks.append(commands)
    return blocks


def documented_pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pages += sorted((ROOT / "packages").glob("*/README.md"))
    return [page for page in pages if page.is_file() and MARKER in page.read_text()]


def _paragraph(text: str, needle: str) -> str:
    """The paragraph of ``text`` that contains ``needle`` (one line of words)."""
    for paragraph in re.split(r"\n\s*\n", text):
        words = " ".join(paragraph.split())
        if needle in words:
            return words
    raise AssertionError(f"the page says nothing of {needle!r}")


def _first_hour_figures(text: str, work: Path, printed: dict[str, str]) -> None:
    """What the page says `describe` answers and what the hallucination view flags."""
    text = " ".join(text.split())
    said = re.search(r"`describe` answers `([^`]+)`", text)
    assert said, "first-hour.md: no `describe` answers `...` sentence"
    describe = next(out for command, out in printed.items() if " describe " in f" {command} ")
    assert describe.strip() == said.group(1), (describe, said.group(1))
    flagged = re.search(r"flags the (\w+) (\w+) as \*mentioned, not detected\*", text)
    assert flagged, "first-hour.md: no 'flags the … as *mentioned, not detected*' sentence"
    view = next(out for command, out in printed.items() if " hallucinations " in f" {command} ")
    line = next(x for x in view.splitlines() if x.startswith("Mentioned but not detected:"))
    named = [word.strip() for word in line.split(":", 1)[1].split(",")]
    assert flagged.group(2) in named, (line, flagged.group(0))


def _audit_figures(text: str, work: Path, printed: dict[str, str]) -> None:
    """Every number of the toy audit's table, and the gallery's most confident hallucination."""
    from jmllm.joint.audit import parse_answer

    report = json.loads((work / "toy-audit" / "report.json").read_text())
    pope, conf = report["pope"], report["owl_confidence"]
    answers = [
        question
        for line in (work / "toy-audit" / "results.jsonl").read_text().splitlines()
        if line.strip()
        for question in json.loads(line)["questions"]
    ]
    unparsed_authors = sum(
        parse_answer(q["answer"], q["finished"], "authors") == "other" for q in answers
    )
    rows = {
        "questions (every shape, present and absent)": str(report["questions"]),
        "unparsed, `--parse authors` (the default, with `--tiny` too)": f"{unparsed_authors} (",
        "POPE accuracy / precision / recall / F1": " / ".join(
            f"{pope[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1")
        ),
        "yes-ratio": f"{pope['yes_ratio']:.2f}",
        "mean OWL-ViT score: yes & present / no & present / yes & absent / no & absent": " / ".join(
            f"{conf[k]:.3f}" for k in ("yes_present", "no_present", "yes_absent", "no_absent")
        ),
        "AUROC of OWL-ViT's score for J's \"yes\"": f"{report['auroc_owl_predicts_yes']:.3f}",
    }
    assert report["parse_rule"] == "authors" and report["unparsed"] == unparsed_authors, report
    for label, value in rows.items():
        row = next((x for x in text.splitlines() if x.startswith(f"| {label} |")), None)
        assert row is not None, f"hallucination-audit.md: no table row {label!r}"
        assert row.startswith(f"| {label} | {value}"), (row, value)
    count = report["owl_confidence_counts"]["yes_absent"]
    shows = _paragraph(text, "positive hallucinations have a mean OWL-ViT score of")
    assert f"The {count} positive hallucinations have a mean OWL-ViT score of " in shows
    assert f"mean OWL-ViT score of {conf['yes_absent']:.3f}" in shows
    top = report["hallucinations"][0]
    sentence = _paragraph(text, "the most confident one")
    assert f"*{top['class']}*" in sentence and top["file"] in sentence, (top, sentence)


# the figures a page states about its own commands' outputs (page name: check)
FIGURES: dict[str, Callable[[str, Path, dict[str, str]], None]] = {
    "first-hour.md": _first_hour_figures,
    "hallucination-audit.md": _audit_figures,
}


def test_marked_blocks_are_found_and_parsed():
    text = f"x\n{MARKER}\n```bash\na --b \\\n   c  # note\n# comment\n\nd\n```\n```bash\nnot marked\n```\n"
    assert marked_blocks(text) == [["a --b     c  # note", "d"]]
    assert any(page.name == "first-hour.md" for page in documented_pages())


@pytest.mark.slow
@pytest.mark.parametrize("page", documented_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_offline_commands_run_as_written(page, tmp_path):
    blocks = marked_blocks(page.read_text())
    assert blocks, f"{page}: marked, but no fenced block follows the marker"
    bin_dir = str(Path(sys.executable).parent)  # the environment's console scripts
    env = {**os.environ, **OFFLINE_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env["JMLLM_CACHE"] = str(tmp_path / ".cache")
    work = tmp_path / "work"
    work.mkdir()
    printed: dict[str, str] = {}
    for commands in blocks:
        for command in commands:
            program = shlex.split(command, comments=True)[0]
            if shutil.which(program, path=env["PATH"]) is None:
                pytest.skip(f"{program} is not installed here (an isolated package test)")
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, (
                f"{page.relative_to(ROOT)}: `{command}` exited {done.returncode}:\n"
                f"{done.stderr[-3000:]}"
            )
            printed[command] = done.stdout
    check = FIGURES.get(page.name)
    if check is not None:
        check(page.read_text(), work, printed)


def test_every_page_with_figures_runs_its_commands():
    """A page whose figures are checked is a page whose commands run."""
    assert set(FIGURES) <= {page.name for page in documented_pages()}
