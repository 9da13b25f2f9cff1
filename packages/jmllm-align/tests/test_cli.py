from __future__ import annotations

import json

import pytest
import torch

from jmllm.align import AlignmentConfig, AlignmentLayer, load_alignment, save_alignment
from jmllm.align.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refusals (bad option values): exit code 2
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_info_text_and_json(tmp_path, capsys):
    layer = AlignmentLayer(
        AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4, source_model="o")
    )
    path = save_alignment(layer, tmp_path / "w.safetensors", {"steps": 3, "images_skipped": 1})
    code, out, _ = _run(capsys, "info", str(path), "--json-out", "-")
    assert code == 0
    data = json.loads(out)
    assert data["config"]["architecture"] == "llava-mlp" and data["config"]["source_model"] == "o"
    assert data["provenance"] == {"steps": 3, "images_skipped": 1}
    code, out, _ = _run(capsys, "info", str(path))
    assert code == 0 and "architecture: llava-mlp" in out and "steps: 3" in out


def _with_metadata(path, **changes):  # type: ignore[no-untyped-def]
    """Rewrite a W file's metadata (what someone else's file could hold)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
        metadata = dict(f.metadata())
    metadata.update(changes)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_info_never_prints_control_characters(tmp_path, capsys):
    """A provenance holding terminal escapes (retitle, clear screen) is shown, not obeyed."""
    layer = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4))
    evil = "\x1b]0;PWNED\x07\x1b[2J\u202eevil"
    path = save_alignment(layer, tmp_path / "w.safetensors", {evil: evil, "long": "y" * 50_000})
    _with_metadata(path, config=json.dumps({**layer.config.to_dict(), "source_model": evil}))
    code, out, _ = _run(capsys, "info", str(path))
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]0;PWNED\\x07\\x1b[2J" in out  # visible, escaped
    assert max(len(line) for line in out.splitlines()) < 1100  # one long value is cut
    code, out, _ = _run(capsys, "info", str(path), "--json")
    assert code == 0 and "\x1b" not in out and json.loads(out)["provenance"][evil] == evil


@pytest.mark.parametrize("field", ["provenance", "config"])
def test_deeply_nested_metadata_is_one_line_exit_2(tmp_path, capsys, field):
    layer = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=4, out_dim=8, num_tokens=4))
    path = save_alignment(layer, tmp_path / "w.safetensors", {"steps": 1})
    _with_metadata(path, **{field: "[" * 100_000 + "]" * 100_000})
    for command in (["info"], ["info", "--json"]):
        code, _, err = _run(capsys, *command, str(path))
        assert code == 2, err
        _one_line_error(err, "w.safetensors", "nested too deeply")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_alignment(path)


def test_errors_are_one_line_with_non_zero_exit(tmp_path, capsys):
    code, _, err = _run(capsys, "info", str(tmp_path / "absent.safetensors"))
    assert code != 0
    _one_line_error(err, "absent.safetensors", "no such file")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    code, _, err = _run(capsys, "info", str(bad))
    assert code != 0
    _one_line_error(err, "bad.safetensors", "not a readable safetensors file")
    code, _, err = _run(
        capsys, "import-pth", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors")
    )
    assert code != 0
    _one_line_error(err, "nope.pth")
    code, _, err = _run(capsys, "train", str(tmp_path / "no-images"), "--out", str(tmp_path / "r"))
    assert code != 0
    _one_line_error(err, "no-images", "no such image folder")
    code, _, err = _run(
        capsys, "train", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "colour=1"
    )
    assert code != 0
    _one_line_error(err, "colour")


def test_import_pth(tmp_path, capsys):
    torch.manual_seed(0)
    state = {
        "input_layer.weight": torch.randn(16, 8), "input_layer.bias": torch.randn(16),
        "hidden_layers.0.weight": torch.randn(16, 16), "hidden_layers.0.bias": torch.randn(16),
        "output_layer.weight": torch.randn(12, 16), "output_layer.bias": torch.randn(12),
    }  # fmt: skip
    torch.save(state, tmp_path / "W.pth")
    out = tmp_path / "w.safetensors"
    code, text, _ = _run(
        capsys, "import-pth", str(tmp_path / "W.pth"), str(out), "--num-tokens", "4"
    )
    assert code == 0 and str(out) in text and "8 -> 12" in text
    layer = load_alignment(out)
    assert torch.equal(layer.net.output_layer.weight, state["output_layer.weight"])


def test_train_resume_and_eval(tiny, image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        "train", str(image_folder), "--out", str(run), "--preset", "tiny",
        "--owl", str(tiny.owl), "--mllm", str(tiny.llava),
        "--epochs", "1", "--no-progress",
    ]  # fmt: skip
    code, out, _ = _run(capsys, *common, "--max-steps", "2")
    assert code == 0 and "weights:" in out
    code, _, err = _run(capsys, *common)  # the folder holds a run: refuse to overwrite it
    assert code != 0
    _one_line_error(err, "--resume")
    code, out, _ = _run(capsys, *common, "--resume")  # keeps the stored budget of 2 steps
    assert code == 0 and "steps: 2" in out
    code, out, _ = _run(capsys, *common, "--resume", "--max-steps", "0")  # lifts it
    assert code == 0
    assert "steps: 4" in out and "held-out MSE" in out
    weights = run / "alignment.safetensors"
    assert load_alignment(weights).provenance["steps"] == 4
    code, out, _ = _run(
        capsys, "eval", str(weights), str(image_folder), "--limit", "6", "--json-out", "-"
    )
    assert code == 0
    record = json.loads(out)
    assert record["images"] == 6 and record["skipped"] == 0 and record["mse"] > 0
    assert -1 <= record["cosine"] <= 1
    # the preprocessing W was trained with (the tiny preset's: exif), unless another is named
    assert record["preprocessing"] == "exif"
    code, out, _ = _run(
        capsys, "eval", str(weights), str(image_folder), "--limit", "6", "--json",
        "--preprocessing", "authors",
    )  # fmt: skip
    authors = json.loads(out)
    assert code == 0 and authors["preprocessing"] == "authors"
    assert authors["mse"] != record["mse"]  # the processors' resize: other pixels, other tokens
    # a run trained on the authors' pixels says so, and --resume keeps it
    code, _, _ = _run(capsys, *common[:3], str(tmp_path / "a"), *common[4:], "--max-steps", "1",
                      "--preprocessing", "authors")  # fmt: skip
    assert code == 0
    trained = load_alignment(tmp_path / "a" / "alignment.safetensors")
    assert trained.provenance["preprocessing"] == "authors"
    code, _, err = _run(capsys, *common[:3], str(tmp_path / "a"), *common[4:], "--resume",
                        "--preprocessing", "exif")  # fmt: skip
    assert code == 2
    _one_line_error(err, "--preprocessing: cannot change preprocessing on --resume")


def test_demo_writes_weights_and_prints_where(tiny, tmp_path, capsys):
    code, out, _ = _run(
        capsys, "demo", "--out", str(tmp_path / "demo"), "--cache-dir", str(tiny.root),
        "-n", "24", "--epochs", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0
    weights = tmp_path / "demo" / "run" / "alignment.safetensors"
    assert f"weights: {weights}" in out
    layer = load_alignment(weights)
    assert layer.provenance["eval_mse"] < layer.provenance["eval_mse_initial"]


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "info", "import-pth", "demo"):
        assert command in out


def test_unreachable_model_is_named(image_folder, tmp_path, capsys):
    code, _, err = _run(
        capsys, "train", str(image_folder), "--out", str(tmp_path / "r"), "--eval-images", "8",
        "--owl", str(tmp_path / "no-owl"), "--mllm", str(tmp_path / "no-llava"),
    )  # fmt: skip
    assert code != 0
    _one_line_error(err, "no-owl", "cannot load OWL-ViT")


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_import_pth_transformer_and_its_heads(tmp_path, capsys):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=16)
    module = torch.nn.Module()
    module.linear_in = torch.nn.Linear(8, 16)
    module.transformer_encoder = torch.nn.TransformerEncoder(layer, num_layers=2)
    module.linear_out = torch.nn.Linear(16, 12)
    torch.save(module.state_dict(), tmp_path / "T.pth")
    out = tmp_path / "t.safetensors"
    code, text, _ = _run(
        capsys, "import-pth", str(tmp_path / "T.pth"), str(out), "--num-heads", "4"
    )
    assert code == 0 and "transformer, 8 -> 12, width 16, 2 layers, 4 heads" in text
    assert load_alignment(out).config.num_heads == 4
    code, _, err = _run(capsys, "import-pth", str(tmp_path / "T.pth"), str(out), "--num-heads", "0")
    assert code != 0
    _one_line_error(err, "--num-heads: must be >= 1")
