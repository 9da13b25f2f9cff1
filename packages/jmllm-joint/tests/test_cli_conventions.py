"""jmllm-joint under the shared rules (docs/conventions.md): every number checked at the
boundary on every command, exit codes 2 / 1 / 3, no empty output folder after a failure, ordinary
file modes, local paths checked before any Hub call, detection without LLaVA."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from jmllm.joint import cli

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird"

# The command line of every jmllm-joint command, with what it needs to run.
COMMANDS = {
    "demo": ["demo", "--out", "{out}"],
    "chat": ["chat", "{image}", "--tiny", "-p", "Hi?", "--out", "{out}", "-q", "cat"],
    "describe": ["describe", "{image}", "--tiny"],
    "detect": ["detect", "{image}", "--tiny", "-q", "cat", "--out", "{out}"],
    "explain": ["explain", "{image}", "--tiny", "-p", QUESTION, "-q", "bird", "--out", "{out}"],
    "hallucinations": ["hallucinations", "{image}", "--tiny", "-p", QUESTION, "--out", "{out}"],
    "wsol": ["wsol", "{data}", "--tiny"],
}
GENERATION = ("demo", "chat", "describe")
DETECTION = ("demo", "chat", "detect")
BAD_OPTIONS = [
    *[(c, ["--top-p", v]) for c in GENERATION for v in ("2", "nan", "0", "-0.5")],
    *[(c, ["--temperature", v]) for c in GENERATION for v in ("nan", "inf", "0", "-1")],
    *[(c, ["--max-new-tokens", v]) for c in (*GENERATION, "explain", "hallucinations") for v in ("0", "nan")],
    *[(c, ["--seed", "-1"]) for c in GENERATION],
    *[(c, ["--threshold", v]) for c in DETECTION for v in ("nan", "-0.1", "1.5", "inf")],
    *[(c, ["--nms", v]) for c in DETECTION for v in ("0", "nan", "2")],
    *[(c, ["--max-boxes", v]) for c in DETECTION for v in ("-1", "2.5")],
    *[(c, ["--query-template", v]) for c in DETECTION for v in ("{}{}", "{0}", "{:>9}", "plain", "{x}")],
    *[("hallucinations", ["--threshold", v]) for v in ("2", "0", "1", "nan")],
    ("explain", ["--position", "nan"]),
    *[("wsol", ["--limit", v]) for v in ("-1", "0", "nan")],
]  # fmt: skip


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (60, 40), (30, 120, 200)).save(path)
    return path


@pytest.fixture
def wsol_data(tmp_path, sample_images):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, im in enumerate(sample_images[:2]):
        im.save(root / "images" / f"{i}.png")
        rows.append(f"{i}.png,2,2,{im.width - 3},{im.height - 3}")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rows.append("broken.png,1,1,4,4")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    return root


def _argv(command: str, **values: object) -> list[str]:
    return [a.format(**values) for a in COMMANDS[command]]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(("command", "option"), BAD_OPTIONS)
def test_every_command_refuses_bad_numbers_before_loading(
    command, option, image_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("JMLLM_CACHE", str(tmp_path / "cache"))  # nothing may be built
    argv = _argv(command, image=image_file, out=tmp_path / "out", data=tmp_path) + option
    code, out, err = _run(argv, capsys)
    assert code == 2 and not out
    _one_line(err, f"argument {option[0]}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_query_template_is_checked_in_the_api_too(tiny_joint):
    from jmllm.joint import PromptError

    for bad in ("{}{}", "{0}", "a {:>30}", "{name}"):
        with pytest.raises(PromptError, match="query template"):
            tiny_joint.encode_queries(["cat"], bad)
    assert tiny_joint.encode_queries(["cat"], "{{x}} {}").shape[0] == 1


# ------------------------------------------------------------------------------- exit codes
def test_runtime_failure_is_exit_1_in_one_line(cli_env, image_file, capsys, monkeypatch):
    from jmllm.joint.model import JointModel

    def out_of_memory(self, *args, **kwargs):
        raise MemoryError("cannot allocate 70 GB")

    monkeypatch.setattr(JointModel, "embed", out_of_memory)
    code, _, err = _run(_argv("describe", image=image_file), capsys)
    assert code == 1
    _one_line(err, "MemoryError", "cannot allocate 70 GB", "--debug")


def test_partial_results_are_exit_3(cli_env, wsol_data, tmp_path, capsys):
    code, out, _ = _run(
        [*_argv("wsol", data=wsol_data), "--json-out", str(tmp_path / "w.json")], capsys
    )
    summary = json.loads(out)
    assert code == 3 and summary["num_images"] == 2 and summary["skipped"] == 1
    saved = json.loads((tmp_path / "w.json").read_text())
    assert list(saved["skipped"]) == ["broken.png"]


# ---------------------------------------------------------- failed runs leave no empty folder
@pytest.mark.parametrize("command", ["demo", "chat", "detect", "explain", "hallucinations"])
def test_failed_run_leaves_no_output_folder(command, cli_env, image_file, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    argv = [a for a in _argv(command, image=image_file, out=out) if a != "--tiny"]
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    weights = cli_env / "tiny" / "alignment.safetensors"
    argv += ["--owl", str(empty), "--mllm", str(empty), "--alignment", str(weights)]
    code, _, err = _run(argv, capsys)
    assert code == 2
    _one_line(err, "not-a-model", "cannot load OWL-ViT config")
    assert not (tmp_path / "new").exists()


def test_failure_after_loading_leaves_no_output_folder(cli_env, image_file, tmp_path, capsys):
    from jmllm.align.testing import png_claiming

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(30_000, 30_000))
    code, _, err = _run(_argv("detect", image=bomb, out=tmp_path / "o"), capsys)
    assert code == 2
    _one_line(err, "bomb.png", "image too large")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------- ordinary file modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_output_file_has_ordinary_permissions(
    umask, cli_env, image_file, wsol_data, tmp_path, capsys
):
    old = os.umask(umask)
    try:
        for command in ("detect", "explain", "hallucinations"):
            argv = _argv(command, image=image_file, out=tmp_path / command)
            if command != "detect":
                argv += ["--answer", ANSWER, "--max-new-tokens", "4"]
            assert cli.main(argv) == 0, capsys.readouterr().err
        cli.main([*_argv("wsol", data=wsol_data), "--json-out", str(tmp_path / "w" / "w.json")])
    finally:
        os.umask(old)
    capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "cub" not in p.parts]
    assert len(written) > 10 and not [p for p in written if p.name.endswith(".tmp")]
    for path in written:
        if path.name == "in.png":
            continue
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_wsol_report_leaves_no_temp_file_on_error(tmp_path, monkeypatch):
    import jmllm.align.files as files
    from jmllm.joint.wsol import BoxAccumulator, WsolReport

    acc = BoxAccumulator([0.5])
    acc.add(np.eye(4), np.array([[0, 0, 1, 1]]))
    report = WsolReport(results={"ga": acc.result()}, num_images=1)

    def broken_replace(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        report.save(tmp_path / "wsol.json")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- models: what is loaded, when
def test_detect_loads_only_owlvit(
    cli_env, tiny_joint_paths, image_file, tmp_path, capsys, monkeypatch
):
    import transformers

    def no_llava(*args, **kwargs):
        raise AssertionError("detect must not load LLaVA")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", no_llava)
    monkeypatch.setattr("jmllm.joint.model.loading.load_alignment", no_llava)
    code, out, _ = _run(_argv("detect", image=image_file, out=tmp_path / "t"), capsys)
    assert code == 0 and "Report:" in out
    # no --alignment needed for detection with real (here: local) checkpoints either
    argv = ["detect", str(image_file), "--owl", str(tiny_joint_paths.owl), "-q", "cat"]
    code, _, err = _run([*argv, "--out", str(tmp_path / "o"), "--threshold", "0"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "result.json").read_text())
    assert record["sources"] == {"owl": str(tiny_joint_paths.owl)} and record["detections"]


def test_detector_refuses_language_work(tiny_joint_paths, image_file):
    from jmllm.joint import JointModel, JointModelError

    detector = JointModel.detector(tiny_joint_paths.owl, device="cpu")
    assert not detector.has_language and detector.detect([image_file], ["cat"], threshold=0.0)
    with pytest.raises(JointModelError, match="detection only"):
        detector.generate([image_file], "Hi?")


def test_missing_local_weights_are_named_before_any_hub_call(image_file, capsys, monkeypatch):
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError("a Hub/config call was made before checking local paths")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hub)
    for missing in ("W.safetensors", "runs/w/alignment.safetensors", "./w"):
        code, _, err = _run(["describe", str(image_file), "--alignment", missing], capsys)
        assert code == 2
        _one_line(err, f"{missing}: no such alignment weights file or folder")
    code, _, err = _run(
        ["describe", str(image_file), "--alignment", "W.safetensors", "--owl", "/no/owl"], capsys
    )
    assert code == 2
    _one_line(err, "/no/owl: no such OWL-ViT folder")
