"""The shared rules every CLI follows (docs/conventions.md), as jmllm-align applies them:
numbers checked at the boundary, exit codes, resume refusals, output file modes, no temp files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from jmllm.align import AlignmentConfig, AlignmentLayer, load_alignment, save_alignment
from jmllm.align.cli import main
from jmllm.align.files import atomic_write, atomic_write_bytes, file_mode, output_folder
from jmllm.align.options import check_template, exit_code_for


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
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


# -------------------------------------------------------------------- numbers at the boundary
BAD_NUMBERS = [
    # (argv after the command's required arguments, text the one-line error must contain)
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-4"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--batch-size", "0"], "--batch-size"),
    (["--micro-batch-size", "-2"], "--micro-batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--seed", "-3"], "--seed"),
    (["--eval-images", "-1"], "--eval-images"),
    (["--num-workers", "1.5"], "--num-workers"),
    (["--set", "lr=nan"], "lr"),
    (["--set", "lr=NaN"], "lr"),
    (["--set", "lr=Infinity"], "lr"),
    (["--set", "lr=-1"], "lr"),
    (["--set", "grad_clip=nan"], "grad_clip"),
    (["--set", "grad_clip=-1"], "grad_clip"),
    (["--set", "weight_decay=nan"], "weight_decay"),
    (["--set", "betas=[0.9, 2]"], "betas[1]"),
    (["--set", "batch_size=1.5"], "batch_size"),
    (["--set", "epochs=true"], "epochs"),
    (["--set", "progress=1"], "progress"),
    (["--set", "hidden_dim=0"], "hidden_dim"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_NUMBERS)
def test_train_refuses_bad_numbers_in_one_line(tmp_path, capsys, extra, needle):
    folder = tmp_path / "imgs"
    folder.mkdir()
    code, _, err = _run(capsys, "train", str(folder), "--out", str(tmp_path / "run"), *extra)
    assert code == 2
    _one_line(err, needle)
    assert not (tmp_path / "run").exists()  # refused before anything was created


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "{w}", "{imgs}", "--limit", "-1"], "--limit"),
        (["eval", "{w}", "{imgs}", "--limit", "0"], "--limit"),
        (["eval", "{w}", "{imgs}", "--batch-size", "nan"], "--batch-size"),
        (["import-pth", "{w}", "{tmp}/o.safetensors", "--num-tokens", "0"], "--num-tokens"),
        (["demo", "-n", "-5"], "-n/--num-images"),
        (["demo", "--epochs", "0"], "--epochs"),
    ],
)
def test_other_commands_refuse_bad_numbers(tmp_path, capsys, argv, needle):
    values = {"w": str(tmp_path / "w.safetensors"), "imgs": str(tmp_path), "tmp": str(tmp_path)}
    code, out, err = _run(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and "MSE" not in out
    _one_line(err, needle)


def test_huge_w_config_is_refused_before_allocating(tiny, image_folder, tmp_path, capsys):
    code, _, err = _run(
        capsys, "train", str(image_folder), "--out", str(tmp_path / "r"), "--set",
        "hidden_dim=1000000000000", "--preset", "tiny", "--owl", str(tiny.owl),
        "--mllm", str(tiny.llava),
    )  # fmt: skip
    assert code == 2
    _one_line(err, "hidden_dim", "parameters")
    with pytest.raises(ValueError, match=r"hidden_dim=1000000000000.*the limit"):
        AlignmentConfig("deep-mlp", hidden_dim=10**12)


def test_query_templates_need_exactly_one_bare_field():
    assert check_template("a photo of a {}") == "a photo of a {}"
    assert check_template("{{literal}} {}") == "{{literal}} {}"
    for bad in ("{}{}", "no field", "{0}", "{name}", "{:>10}", "{!r}", "a {", "}{}"):
        with pytest.raises(ValueError, match="template"):
            check_template(bad)


# ------------------------------------------------------------------------------- exit codes
def test_exit_code_convention():
    from jmllm.align.features import ModelLoadError

    assert exit_code_for(ValueError("x")) == 2
    assert exit_code_for(FileNotFoundError("x")) == 2
    assert exit_code_for(ModelLoadError("no such model")) == 2
    assert exit_code_for(MemoryError()) == 1
    assert exit_code_for(RuntimeError("CUDA out of memory")) == 1
    assert exit_code_for(OSError(28, "No space left on device")) == 1
    assert exit_code_for(KeyboardInterrupt()) == 130


def test_runtime_failure_is_exit_1_in_one_line(tmp_path, capsys, monkeypatch):
    import jmllm.align.weights as weights

    def explode(*args, **kwargs):
        raise MemoryError("cannot allocate")

    layer = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4))
    path = save_alignment(layer, tmp_path / "w.safetensors")
    monkeypatch.setattr(weights, "read_metadata", explode)
    code, _, err = _run(capsys, "info", str(path))
    assert code == 1
    _one_line(err, "MemoryError", "cannot allocate")


def test_eval_exit_codes_count_unreadable_images(tiny, image_folder, tmp_path, capsys):
    from transformers import AutoConfig

    from jmllm.align import alignment_config_for

    config = alignment_config_for(
        AutoConfig.from_pretrained(tiny.owl), AutoConfig.from_pretrained(tiny.llava), "llava-mlp",
        source_model=str(tiny.owl), target_model=str(tiny.llava),
    )  # fmt: skip
    weights = save_alignment(AlignmentLayer(config), tmp_path / "w.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = _run(capsys, "eval", str(weights), str(broken), "--json-out", "-")
    assert code == 2 and not out  # nothing readable: no "MSE: nan"
    _one_line(err, "no image could be read")
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"{broken / 'a.png'}\n{next(p for p in sorted(image_folder.rglob('*')) if p.is_file())}\n"
    )
    code, out, _ = _run(capsys, "eval", str(weights), str(listing), "--json-out", "-")
    record = json.loads(out)
    assert code == 3 and record["images"] == 1 and record["skipped"] == 1


# ------------------------------------------------------------------- resume refuses changes
@pytest.fixture
def started_run(tiny, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "train", str(image_folder), "--out", str(run), "--preset", "tiny",
        "--owl", str(tiny.owl), "--mllm", str(tiny.llava), "--no-progress",
    ]  # fmt: skip
    code, _, _ = _run(capsys, *common, "--max-steps", "1", "--set", "grad_clip=1.0")
    assert code == 0
    return run, common


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["--lr", "0.5"], "--lr: cannot change lr on --resume"),
        (["--batch-size", "4"], "--batch-size: cannot change batch_size"),
        (["--set", "grad_clip=2.0"], "--set grad_clip=2.0: cannot change grad_clip"),
        (["--set", "weight_decay=0.5"], "--set weight_decay=0.5: cannot change"),
        (["--preset", "paper"], "--preset paper: cannot change"),
    ],
)
def test_resume_refuses_changed_options_naming_them(started_run, capsys, change, needle):
    run, common = started_run
    before = (run / "checkpoint.pt").read_bytes()
    code, _, err = _run(capsys, *common, "--resume", *change)
    assert code == 2
    _one_line(err, needle)
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing was trained


def test_resume_accepts_the_same_options_and_bookkeeping_changes(started_run, capsys):
    run, common = started_run
    code, out, _ = _run(
        capsys, *common, "--resume", "--set", "grad_clip=1.0", "--set", "log_every=5",
        "--max-steps", "2",
    )  # fmt: skip
    assert code == 0 and "steps: 2" in out
    assert json.loads((run / "config.json").read_text())["grad_clip"] == 1.0


# ----------------------------------------------------------------- output files: one policy
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_align_output_has_ordinary_permissions(tiny_config, tmp_path, umask):
    from jmllm.align.train import train

    old = os.umask(umask)
    try:
        path = save_alignment(
            AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4)),
            tmp_path / "w" / "w.safetensors",
        )
        train(tiny_config.replace(max_steps=1, eval_images=2), tmp_path / "run")
    finally:
        os.umask(old)
    files = [path, *sorted((tmp_path / "run").iterdir())]
    names = {f.name for f in files}
    assert {"checkpoint.pt", "config.json", "metrics.jsonl", "alignment.safetensors"} <= names
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert not [f for f in tmp_path.rglob("*.tmp")]


def test_atomic_write_removes_its_temp_file_on_error(tmp_path, monkeypatch):
    def failing(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "out.json", failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write_bytes(tmp_path / "keep.bin", b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(tmp_path / "keep.bin", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]
    assert (tmp_path / "keep.bin").read_bytes() == b"old"
    assert stat.S_IMODE((tmp_path / "keep.bin").stat().st_mode) == file_mode()


def test_output_folder_removes_only_the_empty_folders_it_made(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), output_folder(target):
        assert target.is_dir()
        raise RuntimeError("model failed")
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "kept" / "new"):
        raise RuntimeError("model failed")
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
    with pytest.raises(RuntimeError), output_folder(tmp_path / "full") as out:
        (out / "partial.txt").write_text("written before the failure")
        raise RuntimeError("late failure")
    assert (tmp_path / "full" / "partial.txt").is_file()  # never deletes written output
    with output_folder(tmp_path / "ok") as out:
        pass
    assert out.is_dir()


def test_failed_train_leaves_no_empty_run_folder(image_folder, tmp_path, capsys):
    code, _, err = _run(
        capsys, "train", str(image_folder), "--out", str(tmp_path / "new" / "run"),
        "--owl", str(tmp_path / "no-owl"), "--mllm", str(tmp_path / "no-llava"),
        "--eval-images", "8",
    )  # fmt: skip
    assert code == 2
    _one_line(err, "no-owl", "cannot load OWL-ViT")
    assert not (tmp_path / "new").exists()


def test_training_that_diverges_writes_no_weights_and_exits_1(tiny_config, tmp_path, capsys):
    from jmllm.align.train import TrainingDivergedError, train

    with pytest.raises(TrainingDivergedError, match="diverged"):
        train(tiny_config.replace(max_steps=2, lr=1e30, eval_images=0), tmp_path / "run")
    assert not (tmp_path / "run" / "alignment.safetensors").exists()
    assert exit_code_for(TrainingDivergedError("x")) == 1


def test_load_alignment_keeps_finite_weights_exactly(tmp_path):
    torch.manual_seed(0)
    layer = AlignmentLayer(AlignmentConfig("deep-mlp", in_dim=4, out_dim=6, hidden_dim=8))
    loaded = load_alignment(save_alignment(layer, tmp_path / "w.safetensors"))
    for (name, a), (_, b) in zip(
        layer.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_failed_folder_build_leaves_no_temporary_folder(tmp_path):
    from jmllm.align.testing import _atomic_dir

    def build(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        _atomic_dir(tmp_path / "model", build)
    assert list(tmp_path.iterdir()) == []
