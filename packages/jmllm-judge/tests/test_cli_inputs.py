"""Hostile and mistaken inputs to every command: one line on stderr naming the input, no traceback,
exit code 2, nothing written (and no folder left behind); numbers checked at the boundary; output
files with ordinary permissions; credentials never accepted in the URL or echoed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jmllm.judge.captions import save_captions
from jmllm.judge.cli import main
from jmllm.judge.client import JudgeSettings, image_data_url
from jmllm.judge.conventions import EXIT_USAGE, exit_code_for
from jmllm.judge.errors import JudgeError
from jmllm.judge.files import sha256_file
from jmllm.judge.manifest import Manifest, ManifestImage, sample_folder
from jmllm.judge.testing import write_png_header

SECRET = "hunter2-pw-0123456789"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit code and stderr of ``jmllm-judge argv`` run in-process (argparse's exits too)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture
def inputs(tmp_path: Path, manifest: Manifest, make_captions) -> dict[str, Path]:
    """A valid manifest and captions file, and a plain file to misuse as a folder."""
    manifest_path = manifest.save(tmp_path / "in" / "manifest.json")
    captions = save_captions(tmp_path / "in" / "a.jsonl", make_captions(manifest, "A"), manifest)
    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder")
    return {"manifest": manifest_path, "captions": captions, "file": plain}


def _run(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "run", "--manifest", str(inputs["manifest"]), "--captions", str(inputs["captions"]),
        "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--api-key-env", "JUDGE_KEY",
        "-o", str(out), *extra,
    ]  # fmt: skip


def _report(results: Path, out: Path, *extra: str) -> list[str]:
    return ["report", str(results), "-o", str(out), *extra]


def _results(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps(
            {"format": "jmllm-judge/results", "version": 1, "settings": {}, "systems": ["A"],
             "n_images": 0, "records": []}
        )
    )  # fmt: skip
    return path


def _bad_manifest(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "bad-manifest.json"
    path.write_bytes(content)
    return path


def _manifest_doc(images: object) -> bytes:
    doc = {"format": "jmllm-judge/manifest", "version": 1, "seed": 0, "images": images}
    return json.dumps(doc).encode()


# Each case builds the argv from the fixtures; the expected text must appear in the one line.
Case = Callable[[Path, dict[str, Path], Path], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    # -- output paths -------------------------------------------------------------------------
    "run: output's folder is a file": (
        lambda t, i, ro: _run(i, i["file"] / "results.json"),
        "is a file, not a folder",
    ),
    "run: output is a folder": (lambda t, i, ro: _run(i, t), "is a folder"),
    "run: output folder read-only": (
        lambda t, i, ro: _run(i, ro / "results.json"),
        "cannot write in",
    ),
    "run: cache is a folder": (
        lambda t, i, ro: _run(i, t / "o" / "r.json", "--cache", str(t)),
        "--cache",
    ),
    "report: output is a file": (
        lambda t, i, ro: _report(_results(t), i["file"]),
        "exists and is not a folder",
    ),
    "report: output folder read-only": (
        lambda t, i, ro: _report(_results(t), ro / "report"),
        "cannot write in",
    ),
    "sample: output's folder is a file": (
        lambda t, i, ro: ["sample", "--folder", str(t), "-o", str(i["file"] / "m.json")],
        "is a file, not a folder",
    ),
    "captions: output folder read-only": (
        lambda t, i, ro: [
            "captions",
            "--manifest",
            str(i["manifest"]),
            "--system",
            "S",
            "--from-jsonl",
            str(i["captions"]),
            "-o",
            str(ro / "c.jsonl"),
        ],
        "cannot write in",
    ),
    # -- numbers ------------------------------------------------------------------------------
    "report --resamples 0": (
        lambda t, i, ro: _report(_results(t), t / "rep", "--resamples", "0"),
        "--resamples: must be in [1, 1e+07], got 0",
    ),
    "run --timeout nan": (
        lambda t, i, ro: _run(i, t / "o.json", "--timeout", "nan"),
        "--timeout: must be a finite number",
    ),
    "run --timeout -1": (
        lambda t, i, ro: _run(i, t / "o.json", "--timeout", "-1"),
        "--timeout: must be in (0, 86400]",
    ),
    "run --timeout inf": (
        lambda t, i, ro: _run(i, t / "o.json", "--timeout", "inf"),
        "--timeout: must be a finite number",
    ),
    "run --temperature nan": (
        lambda t, i, ro: _run(i, t / "o.json", "--temperature", "nan"),
        "--temperature: must be a finite number",
    ),
    "run --temperature 3": (
        lambda t, i, ro: _run(i, t / "o.json", "--temperature", "3"),
        "--temperature: must be in [0, 2]",
    ),
    "run --concurrency 0": (
        lambda t, i, ro: _run(i, t / "o.json", "--concurrency", "0"),
        "--concurrency: must be in [1, 4096]",
    ),
    "run --max-attempts 0": (
        lambda t, i, ro: _run(i, t / "o.json", "--max-attempts", "0"),
        "--max-attempts",
    ),
    "run --max-tokens 0": (
        lambda t, i, ro: _run(i, t / "o.json", "--max-tokens", "0"),
        "--max-tokens: must be >= 1",
    ),
    "sample -n 0": (
        lambda t, i, ro: ["sample", "--folder", str(t), "-n", "0", "-o", str(t / "m.json")],
        "-n/--num-images: must be >= 1",
    ),
    "sample -n ten": (
        lambda t, i, ro: ["sample", "--folder", str(t), "-n", "ten", "-o", str(t / "m.json")],
        "must be an integer",
    ),
    "captions --batch-size 0": (
        lambda t, i, ro: [
            "captions",
            "--manifest",
            str(i["manifest"]),
            "--system",
            "S",
            "--joint",
            "--batch-size",
            "0",
            "-o",
            str(t / "c.jsonl"),
        ],
        "--batch-size: must be >= 1",
    ),
    # -- malformed input files ----------------------------------------------------------------
    'manifest "images": "str"': (
        lambda t, i, ro: _run(
            {**i, "manifest": _bad_manifest(t, _manifest_doc("str"))}, t / "o" / "r.json"
        ),
        "'images' must be a list",
    ),
    "manifest images are not objects": (
        lambda t, i, ro: _run(
            {**i, "manifest": _bad_manifest(t, _manifest_doc([1, 2]))}, t / "o" / "r.json"
        ),
        "images[0] must be an object",
    ),
    "manifest image path is a number": (
        lambda t, i, ro: _run(
            {**i, "manifest": _bad_manifest(t, _manifest_doc([{"image_id": "1", "path": 3}]))},
            t / "o" / "r.json",
        ),
        "images[0].path must be a string",
    ),
    "manifest nested 100000 deep": (
        lambda t, i, ro: _run(
            {**i, "manifest": _bad_manifest(t, b"[" * 100_000 + b"]" * 100_000)},
            t / "o" / "r.json",
        ),
        "nested too deeply",
    ),
    "manifest not UTF-8": (
        lambda t, i, ro: _run(
            {**i, "manifest": _bad_manifest(t, b'{"format": "\xff\xfe"}')}, t / "o" / "r.json"
        ),
        "not UTF-8",
    ),
    "captions file not UTF-8": (
        lambda t, i, ro: _run(
            {**i, "captions": _bad_manifest(t, b'{"system": "A", "caption": "caf\xe9"}\n')},
            t / "o" / "r.json",
        ),
        ":1: not UTF-8",
    ),
    "from-jsonl not UTF-8": (
        lambda t, i, ro: [
            "captions",
            "--manifest",
            str(i["manifest"]),
            "--system",
            "S",
            "--from-jsonl",
            str(_bad_manifest(t, b"\xc3\x28\n")),
            "-o",
            str(t / "c.jsonl"),
        ],
        "not UTF-8",
    ),
    "results records are not a list": (
        lambda t, i, ro: _report(
            _bad_manifest(t, json.dumps({"format": "jmllm-judge/results", "records": 5}).encode()),
            t / "rep",
        ),
        "malformed",
    ),
    # -- the judge's URL ----------------------------------------------------------------------
    "run --base-url with user:pw@": (
        lambda t, i, ro: [
            *_run(i, t / "o" / "r.json")[:-2],
            "--base-url",
            f"http://judge:{SECRET}@127.0.0.1:9/v1",
            "-o",
            str(t / "o" / "r.json"),
        ],
        "contains credentials",
    ),
    "run --base-url ftp://": (
        lambda t, i, ro: [*_run(i, t / "o" / "r.json"), "--base-url", "ftp://127.0.0.1/v1"],
        "must be an http:// or https:// URL",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    tmp_path: Path,
    inputs: dict[str, Path],
    read_only_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    build, needle = CASES[case]
    argv = build(tmp_path, inputs, read_only_dir)
    before = {p for p in tmp_path.rglob("*")}
    code, err = run_cli(argv, capsys)
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jmllm-judge"), err
    assert needle in lines[0], err
    assert SECRET not in err
    # nothing written, and no folder left behind
    assert {p for p in tmp_path.rglob("*")} == before


def test_the_same_classes_through_a_real_process(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """One case end to end in a subprocess: what a user's shell sees."""
    env = {**os.environ, "JUDGE_KEY": "sk-test"}
    command = [sys.executable, "-m", "jmllm.judge.cli", *_run(inputs, inputs["file"] / "r.json")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_settings_refuse_non_finite_numbers() -> None:
    """The API (not only the CLI) refuses NaN: a NaN timeout made every request fail and be
    retried to the last attempt."""
    for field in ("timeout_s", "temperature"):
        with pytest.raises(JudgeError, match="finite"):
            JudgeSettings(model="m", **{field: float("nan")})  # type: ignore[arg-type]
    with pytest.raises(JudgeError, match="credentials"):
        JudgeSettings(model="m", base_url=f"https://u:{SECRET}@example.org/v1")


def test_exit_code_classes() -> None:
    assert exit_code_for(JudgeError("bad")) == 2
    assert exit_code_for(PermissionError(13, "Permission denied")) == 2
    assert exit_code_for(OSError(28, "No space left on device")) == 1
    assert exit_code_for(RuntimeError("model failed")) == 1


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 28000 x 28000 PNG of a few hundred bytes: refused without decoding, in sampling (skipped
    and counted) and when the image is sent."""
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    bomb = write_png_header(folder / "bomb.png", 28_000, 28_000)
    manifest = sample_folder(folder, 1, seed=0)
    (skipped,) = manifest.origin["skipped"]
    assert "image too large: 28000x28000" in skipped["reason"]
    sneaked = ManifestImage("b", path=bomb, sha256=sha256_file(bomb))
    with pytest.raises(JudgeError, match="image too large"):
        image_data_url(sneaked)


def test_outputs_have_ordinary_permissions(
    tmp_path: Path, inputs: dict[str, Path], judge_server, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    server = judge_server()
    monkeypatch.setenv("JUDGE_KEY", "k")
    old = os.umask(0o002)
    try:
        out = tmp_path / "run"
        argv = _run(inputs, out / "results.json")
        argv[argv.index("--base-url") + 1] = server.base_url
        assert main(argv) == 0
        assert main(_report(out / "results.json", out / "report")) == 0
        assert main(["captions", "--manifest", str(inputs["manifest"]), "--system", "GT",
                     "--from-jsonl", str(inputs["captions"]), "-o", str(out / "c.jsonl")]) == 0  # fmt: skip
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"results.json", "judge-cache.sqlite", "report.md", "c.jsonl"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


def test_failed_run_leaves_no_empty_folder_and_no_cache(
    tmp_path: Path, inputs: dict[str, Path], monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """A run that fails before any judgement is stored (an image deleted since sampling)."""
    monkeypatch.setenv("JUDGE_KEY", "k")
    manifest = Manifest.load(inputs["manifest"])
    assert manifest.images[0].path is not None
    manifest.images[0].path.unlink()
    code, err = run_cli(_run(inputs, tmp_path / "new" / "deeper" / "results.json"), capsys)
    assert code == 2 and "cannot read" in err
    assert not (tmp_path / "new").exists()
