"""Hostile and mistaken inputs to every command, one class at a time: one line on stderr naming
the input, no traceback, exit code 2, nothing written and no folder left behind; numbers finite
and in range at the boundary; templates that never insert the subject refused; two runs into one
output folder never assess a portrait twice (real processes); ordinary file permissions."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from jmllm.align.options import EXIT_USAGE
from jmllm.bias.cli import main
from jmllm.bias.cohorts import parse_spec
from jmllm.bias.errors import BiasInputError
from jmllm.bias.files import LOCK_FILE, append_jsonl, folder_lock
from jmllm.bias.generate import GenerationConfig


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _spec_file(t: Path, content: object) -> str:
    path = t / "spec.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return str(path)


def _template(template: str) -> dict[str, object]:
    return {"name": "t", "template": template,
            "groups": [{"name": "a", "subject": "woman", "images": 1}]}  # fmt: skip


def _cohort(t: Path, *extra: str) -> list[str]:
    return ["cohort", "--spec", "gender", "--out", str(t / "c"), *extra]


def _assess(cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["assess", "--cohort", str(cohort), "--characteristic", "nurse", "--original", "man",
            "--adversarial", "woman", "--out", str(out), "--tiny", *extra]  # fmt: skip


def _holding(folder: Path, name: str) -> Path:
    """``folder`` with a user's file ``name`` in it (an output folder that is not the command's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("the user's")
    return folder


Case = Callable[[Path, Path, Path, Path], list[str]]  # (tmp, cohort, read-only, a file) -> argv
CASES: dict[str, tuple[Case, str]] = {
    # -- output folders that are not the command's -----------------------------------------------
    "cohort --out holds other files": (
        lambda t, c, ro, f: ["cohort", "--spec", "gender", "--tiny", "--out",
                             str(_holding(t / "o", "notes.txt"))],
        "holds 1 entry jmllm-bias cohort did not write (notes.txt)",
    ),
    "cohort --force never replaces the user's": (
        lambda t, c, ro, f: ["cohort", "--spec", "gender", "--tiny", "--force", "--out",
                             str(_holding(t / "o", "manifest.jsonl"))],
        "manifest.jsonl was not written by jmllm-bias cohort",
    ),
    "assess --out holds other files": (
        lambda t, c, ro, f: _assess(c, _holding(t / "o", "notes.txt")),
        "holds 1 entry jmllm-bias assess did not write (notes.txt)",
    ),
    "assess --force never replaces the user's": (
        lambda t, c, ro, f: _assess(c, _holding(t / "o", "report.md"), "--force"),
        "report.md was not written by jmllm-bias assess",
    ),
    # -- output paths -------------------------------------------------------------------------
    "cohort --out is a file": (
        lambda t, c, ro, f: ["cohort", "--spec", "gender", "--out", str(f), "--tiny"],
        "exists and is not a folder",
    ),
    "cohort --out read-only": (
        lambda t, c, ro, f: ["cohort", "--spec", "gender", "--out", str(ro / "c"), "--tiny"],
        "cannot write in",
    ),
    "assess --out is a file": (lambda t, c, ro, f: _assess(c, f), "exists and is not a folder"),
    "assess --out inside a file": (
        lambda t, c, ro, f: _assess(c, f / "out"),
        "is a file, not a folder",
    ),
    "assess --out read-only": (lambda t, c, ro, f: _assess(c, ro / "out"), "cannot write in"),
    "report folder read-only": (lambda t, c, ro, f: ["report", str(ro)], "cannot write in"),
    # -- numbers ------------------------------------------------------------------------------
    "cohort --guidance-scale nan": (
        lambda t, c, ro, f: _cohort(t, "--guidance-scale", "nan"),
        "--guidance-scale: must be a finite number",
    ),
    "cohort --guidance-scale inf": (
        lambda t, c, ro, f: _cohort(t, "--guidance-scale", "inf"),
        "--guidance-scale: must be a finite number",
    ),
    "cohort --high-noise-frac nan": (
        lambda t, c, ro, f: _cohort(t, "--high-noise-frac", "nan"),
        "--high-noise-frac: must be a finite number",
    ),
    "cohort --high-noise-frac 1": (
        lambda t, c, ro, f: _cohort(t, "--high-noise-frac", "1"),
        "--high-noise-frac: must be in (0, 1)",
    ),
    "cohort --denoising-steps 0": (lambda t, c, ro, f: _cohort(t, "--denoising-steps", "0"), "--denoising-steps: must be in"),
    "cohort --size 0": (lambda t, c, ro, f: _cohort(t, "--size", "0"), "--size: must be in"),
    "cohort --size 100": (
        lambda t, c, ro, f: _cohort(t, "--size", "100"),
        "must be a positive multiple of 8, got 100",
    ),
    "cohort --batch-size 0": (
        lambda t, c, ro, f: _cohort(t, "--batch-size", "0"),
        "--batch-size: must be in",
    ),
    "cohort --images-per-group -1": (
        lambda t, c, ro, f: _cohort(t, "--images-per-group", "-1"),
        "--images-per-group: must be in",
    ),
    "assess --eps nan": (
        lambda t, c, ro, f: _assess(c, t / "o", "--eps", "nan"),
        "--eps: must be a finite number",
    ),
    "assess --eps-sweep 1 nan": (
        lambda t, c, ro, f: _assess(c, t / "o", "--eps-sweep", "1", "nan"),
        "--eps-sweep: must be a finite number",
    ),
    "assess --step-size inf": (
        lambda t, c, ro, f: _assess(c, t / "o", "--step-size", "inf"),
        "--step-size: must be a finite number",
    ),
    "assess --step-size 0": (
        lambda t, c, ro, f: _assess(c, t / "o", "--step-size", "0"),
        "--step-size: must be > 0",
    ),
    "assess --steps 0": (
        lambda t, c, ro, f: _assess(c, t / "o", "--steps", "0"),
        "--steps: must be in",
    ),
    "assess --max-new-tokens 0": (
        lambda t, c, ro, f: _assess(c, t / "o", "--max-new-tokens", "0"),
        "--max-new-tokens: must be in",
    ),
    "report --seed -1": (lambda t, c, ro, f: ["report", str(t), "--seed", "-1"], "--seed"),
    # -- spec files ---------------------------------------------------------------------------
    "template with a format spec": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, _template("a {subject:>20}")),
                             "--out", str(t / "c")],
        "template 'a {subject:>20}' never inserts the subject",
    ),
    "template with a conversion": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, _template("a {subject!r}")),
                             "--out", str(t / "c")],
        "template 'a {subject!r}' never inserts the subject",
    ),
    "template with doubled braces": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, _template("a {{subject}}")),
                             "--out", str(t / "c")],
        "never inserts the subject",
    ),
    "template with another field": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, _template("a {subject} {age}")),
                             "--out", str(t / "c")],
        "template 'a {subject} {age}'",
    ),
    "spec not UTF-8": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, b'{"name": "caf\xe9"}'),
                             "--out", str(t / "c")],
        "cannot read spec file",
    ),
    "spec nested 100000 deep": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, b"[" * 100_000 + b"]" * 100_000),
                             "--out", str(t / "c")],
        "spec.json",
    ),
    "spec groups is text": (
        lambda t, c, ro, f: ["cohort", "--spec", _spec_file(t, {**_template("a {subject}"),
                             "groups": "str"}), "--out", str(t / "c")],
        "groups must be a non-empty list",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    tmp_path: Path,
    portraits: Path,
    read_only_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    build, needle = CASES[case]
    argv = build(tmp_path, portraits, read_only_dir, plain)
    before = set(tmp_path.rglob("*"))
    code, err = run_cli(argv, capsys)
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jmllm-bias"), err
    assert needle in lines[0], err
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "spec.json"}  # nothing written


def test_generation_settings_refuse_nan() -> None:
    """NaN in the manifest never equals itself: every rerun regenerated the whole cohort."""
    for field in ("guidance_scale", "high_noise_frac"):
        with pytest.raises(BiasInputError, match=r"finite|in \(0, 1\)"):
            GenerationConfig(**{field: math.nan})  # type: ignore[arg-type]


def test_templates_must_insert_the_subject() -> None:
    for template in ("a {subject:>20}", "a {subject!s}", "{{subject}}", "a {subject}{0}"):
        with pytest.raises(BiasInputError, match=re.escape(f"template {template!r}")):
            parse_spec(_template(template), "s.json")
    spec = parse_spec(_template("a {subject}, smiling"), "s.json")
    assert [im.prompt for im in spec.plan()] == ["a woman, smiling"]


# -- one writer per output folder --------------------------------------------------------------


def _results(out: Path) -> Counter[str]:
    lines = (
        (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
    )
    return Counter(json.loads(line)["image_id"] for line in lines if line.strip())


def test_second_assess_into_one_out_is_refused_and_a_killed_run_resumes(
    tmp_path: Path, make_portraits
) -> None:  # type: ignore[no-untyped-def]
    """Run 1 assesses (and is frozen midway, SIGSTOP, so that it is still running whatever the
    machine's speed); run 2 into the same --out is refused at once (before, it assessed and
    recorded every portrait a second time); run 1 is killed (-9); run 3 takes the folder (the
    kernel released the lock) and finishes: every portrait recorded exactly once."""
    cohort = make_portraits(
        tmp_path / "cohort", {"a": list(range(10, 130, 10)), "b": list(range(15, 135, 10))}
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jmllm.bias", *_assess(cohort, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not _results(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()
        # frozen midway (the tiny J is fast): it holds the folder as a working run does
        first.send_signal(signal.SIGSTOP)
        assert (out / LOCK_FILE).read_text() == str(first.pid)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"jmllm-bias assess: error: {out}: another jmllm-bias assess (process {first.pid}) is writing "
            "here; wait for it to finish (a rerun then resumes) or use another --out"
        ]
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        first.kill()
    done_by_first = _results(out)
    assert 0 < sum(done_by_first.values()) < 24 and set(done_by_first.values()) == {1}
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert "resumed" in third.stdout
    assert _results(out) == Counter({image_id: 1 for image_id in _results(out)})
    assert len(_results(out)) == 24
    assert not (out / LOCK_FILE).exists()


def test_lock_is_per_folder_and_reentrant(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "a", "assess"), folder_lock(tmp_path / "a", "assess"):
        with folder_lock(tmp_path / "b", "assess"):
            pass
        code = (
            "import sys; from jmllm.bias.files import folder_lock\n"
            f"with folder_lock({str(tmp_path / 'a')!r}, 'assess'): pass"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "another jmllm-bias assess" in other.stderr
    assert not (tmp_path / "a" / LOCK_FILE).exists()


def test_outputs_have_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        append_jsonl(tmp_path / "r.jsonl", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.jsonl").stat().st_mode) == 0o664


def test_failed_assess_leaves_no_empty_output_folder(
    tmp_path: Path, portraits: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """Models that cannot be loaded: one line, and the --out folders this run created are gone."""
    out = tmp_path / "new" / "out"
    missing = str(tmp_path / "no-such-model")
    argv = ["assess", "--cohort", str(portraits), "--characteristic", "nurse", "--original", "man",
            "--adversarial", "woman", "--owl", missing, "--mllm", missing,
            "--alignment", str(tmp_path / "w.safetensors"), "--out", str(out)]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no-such-model" in err  # the input that does not load is named
    assert not (tmp_path / "new").exists()
