"""The documented offline commands run as written: the Markdown is the source of truth.

Every fenced ``bash`` block of the repository's Markdown (``README.md``, ``docs/*.md``,
``packages/*/README.md``) that follows a ``<!-- test: offline -->`` line is executed, command by
command (a line ending in ``\\`` continues on the next), in a fresh folder per page, blocks in
page order, with the Hub switched off. A command that fails, or that names an option the code no
longer has, fails this test with the command and its stderr.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
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


def test_marked_blocks_are_found_and_parsed():
    text = f"x\n{MARKER}\n```bash\na --b \\\n   c  # note\n# comment\n\nd\n```\n```bash\nnot marked\n```\n"
    assert marked_blocks(text) == [["a --b     c  # note", "d"]]
    assert any(page.name == "first-hour.md" for page in documented_pages())


@pytest.mark.parametrize("page", documented_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_offline_commands_run_as_written(page, tmp_path):
    blocks = marked_blocks(page.read_text())
    assert blocks, f"{page}: marked, but no fenced block follows the marker"
    bin_dir = str(Path(sys.executable).parent)  # the environment's console scripts
    env = {**os.environ, **OFFLINE_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env["JMLLM_CACHE"] = str(tmp_path / ".cache")
    work = tmp_path / "work"
    work.mkdir()
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
