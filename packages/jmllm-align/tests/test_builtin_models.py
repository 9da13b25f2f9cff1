"""``--tiny`` on jmllm-align: the built-in (toy-world) encoders, offline, through jmllm-joint's one
resolver; a preset for the built-in models never reaches the Hub."""

from __future__ import annotations

import pytest

from jmllm.align.cli import main
from jmllm.align.weights import load_alignment

joint_cli = pytest.importorskip("jmllm.joint.cli")


@pytest.fixture
def scenes(tmp_path):
    from jmllm.joint.toy.scenes import make_scene

    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(6):
        make_scene("heldout", i).image.save(folder / f"s{i}.png")
    return folder


@pytest.mark.parametrize("how", [["--tiny"], ["--preset", "tiny"]])
def test_train_tiny_uses_the_built_in_encoders(scenes, tmp_path, how, monkeypatch, capsys):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    out = tmp_path / "run"
    argv = ["train", str(scenes), "--out", str(out), *how, "--max-steps", "2"]
    assert main([*argv, "--eval-images", "2", "--batch-size", "2", "--no-progress"]) == 0
    config = load_alignment(out / "alignment.safetensors").config
    builtin = joint_cli.builtin_sources()
    assert (config.source_model, config.target_model) == (str(builtin.owl), str(builtin.llava))
    assert config.in_dim == 64 and config.out_dim == 128  # the toy encoders' widths
    # and eval --tiny evaluates it against the same encoders
    assert (
        main(["eval", str(out / "alignment.safetensors"), str(scenes), "--tiny", "--json-out", "-"])
        == 0
    )


def test_tiny_with_explicit_encoders_is_refused(scenes, tmp_path, capsys):
    argv = ["train", str(scenes), "--out", str(tmp_path / "r"), "--tiny", "--owl", "x"]
    assert main(argv) == 2
    assert "--tiny: cannot be combined" in capsys.readouterr().err


def test_max_steps_alone_stops_where_it_says_and_prints_no_info(scenes, tmp_path, capsys):
    """4 training images in batches of 2 are 2 steps an epoch: the toy preset's 8 epochs would
    stop at 16 steps; --max-steps 20 without --epochs runs 20, and without -v stderr holds no
    INFO line (nor any other library's warning)."""
    out = tmp_path / "run"
    argv = ["train", str(scenes), "-o", str(out), "--tiny", "--max-steps", "20"]
    assert main([*argv, "--eval-images", "2", "--batch-size", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "steps: 20 " in captured.out
    assert load_alignment(out / "alignment.safetensors").provenance["steps"] == 20
    assert "INFO" not in captured.err and "Warning" not in captured.err, captured.err
    # --epochs given: the epochs decide, before --max-steps
    argv = ["train", str(scenes), "-o", str(tmp_path / "r2"), "--tiny", "--max-steps", "20"]
    extra = ["--epochs", "3", "--eval-images", "2", "--batch-size", "2", "--no-progress"]
    assert main([*argv, *extra]) == 0
    assert "steps: 6 " in capsys.readouterr().out
