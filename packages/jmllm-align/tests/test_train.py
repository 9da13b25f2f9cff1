from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jmllm.align import load_alignment
from jmllm.align.testing import train_distributed_cpu
from jmllm.align.train import (
    TrainConfig,
    epoch_order,
    load_checkpoint,
    load_preset,
    preset_names,
    rank_shares,
    split_held_out,
    train,
)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_presets():
    assert {"paper", "tiny"} <= set(preset_names())
    paper = load_preset("paper")
    assert (paper.architecture, paper.lr, paper.weight_decay) == ("deep-mlp", 1e-4, 1e-2)
    assert (paper.batch_size, paper.epochs, paper.hidden_dim) == (16, 1, None)
    assert paper.precision == "fp32"  # the authors trained in float32, on GPU too
    # ... on the images as their processors made them; the trainer's own default is the photo one
    assert paper.preprocessing == "authors" and TrainConfig().preprocessing == "exif"
    with pytest.raises(ValueError, match="preprocessing must be authors or exif"):
        paper.replace(preprocessing="pil")
    with pytest.raises(ValueError, match="no such preset"):
        load_preset("huge")
    with pytest.raises(ValueError, match="unknown training option"):
        paper.replace(learning_rate=1)


def test_precision_rule():
    from jmllm.align.train import uses_bf16

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not uses_bf16(load_preset("paper").precision, cuda)  # the paper preset: fp32 on GPU
    assert uses_bf16("auto", cuda) and not uses_bf16("auto", cpu)
    assert uses_bf16("bf16", cpu) and uses_bf16("bf16", cuda)
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        load_preset("paper").replace(precision="fp16")


def test_data_order_is_seeded_disjoint_and_sharded():
    held, rest = split_held_out(50, 5, seed=3)
    assert (held, rest) == split_held_out(50, 5, seed=3)
    assert not set(held) & set(rest) and len(held) == 5 and len(rest) == 45
    e0, e1 = epoch_order(rest, 3, 0), epoch_order(rest, 3, 1)
    assert sorted(e0) == sorted(rest) and e0 != e1 and e0 == epoch_order(rest, 3, 0)
    r0 = rank_shares(e0, batch_size=6, rank=0, world=2, start_step=0)
    r1 = rank_shares(e0, batch_size=6, rank=1, world=2, start_step=0)
    assert len(r0) == 45 // 6
    for step, (a, b) in enumerate(zip(r0, r1, strict=True)):
        assert sorted(a + b) == sorted(e0[step * 6 : (step + 1) * 6])
    assert rank_shares(e0, 6, 0, 2, start_step=4) == r0[4:]


def test_training_lowers_the_held_out_loss(tiny_config, tmp_path):
    result = train(tiny_config, tmp_path / "run")
    assert result.steps == (40 - 8) // 8 * 3
    assert result.initial_eval is not None and result.eval is not None
    assert result.eval.mse < 0.5 * result.initial_eval.mse
    assert result.images_seen == result.steps * 8 and result.images_skipped == 0
    layer = load_alignment(result.weights_path)
    prov = layer.provenance
    assert prov["steps"] == result.steps and prov["images_seen"] == result.images_seen
    assert prov["eval_mse"] == pytest.approx(result.eval.mse)
    assert prov["eval_cosine"] == pytest.approx(result.eval.cosine)
    assert prov["source_model"] == tiny_config.source_model
    assert layer.config.target_model == tiny_config.target_model
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == result.steps and losses[-1] < losses[0]
    assert {"eval_mse", "eval_cosine"} <= rows[-1].keys()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == tiny_config.lr


def test_unreadable_images_are_skipped_and_counted(tiny_config, image_folder, tmp_path):
    good = sorted(str(p) for p in image_folder.rglob("*.png"))[:16]
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(Path(good[0]).read_bytes()[:60])
    listing = tmp_path / "list.txt"
    lines = [*good, "text.jpg", "# a comment", "", "cut.png", str(tmp_path / "missing.png")]
    listing.write_text("\n".join(lines))
    config = tiny_config.replace(images=[str(listing)], batch_size=19, epochs=1, eval_images=0)
    result = train(config, tmp_path / "run")  # one step holding every listed image once
    assert (result.steps, result.images_seen, result.images_skipped) == (1, 16, 3)
    assert result.eval is None  # nothing held out
    assert load_alignment(result.weights_path).provenance["images_skipped"] == 3
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["images_skipped"] == 3


def test_resume_is_exact(tiny_config, tmp_path):
    config = tiny_config.replace(epochs=2, eval_every=3)
    full = train(config, tmp_path / "full")
    # Stopped after step 3 (mid-epoch; steps per epoch = 4), then resumed with image-decoding
    # workers: the data order does not depend on them.
    part = train(config.replace(max_steps=3), tmp_path / "part")
    assert part.steps == 3 and part.checkpoint_path.is_file()
    with pytest.raises(ValueError, match=r"cannot resume with lr=0.1"):
        train(config.replace(lr=0.1), tmp_path / "part", resume=True)
    rest = train(config.replace(num_workers=1), tmp_path / "part", resume=True)
    assert rest.steps == full.steps == 8
    assert rest.images_seen == full.images_seen
    assert _states_equal(rest.layer.state_dict(), full.layer.state_dict())
    saved_full = load_checkpoint(full.checkpoint_path)
    saved_rest = load_checkpoint(rest.checkpoint_path)
    assert saved_rest["step"] == 8 and (saved_rest["epoch"], saved_rest["step_in_epoch"]) == (1, 4)
    assert _states_equal(saved_rest["optimizer"]["state"][0], saved_full["optimizer"]["state"][0])
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # no step twice
    # A finished run resumed again does nothing and keeps its weights.
    again = train(config, tmp_path / "part", resume=True)
    assert again.steps == 8 and _states_equal(again.layer.state_dict(), full.layer.state_dict())


def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"checkpoint.pt: not a readable training checkpoint"):
        load_checkpoint(bad)
    torch.save({"format": "other"}, bad)
    with pytest.raises(ValueError, match="not a jmllm-align training checkpoint"):
        load_checkpoint(bad)


def test_datasets_source_map_style_and_streaming(tiny_config, image_folder, tmp_path):
    base = tiny_config.replace(
        images=[], dataset="imagefolder", dataset_data_dir=str(image_folder), epochs=1
    )
    mapped = train(base, tmp_path / "map")
    assert mapped.steps == (40 - 8) // 8 and mapped.eval.images == 8
    streamed = train(
        base.replace(dataset_streaming=True, shuffle_buffer=8, max_steps=2), tmp_path / "s"
    )
    assert streamed.steps == 2 and streamed.images_seen == 16
    resumed = train(
        base.replace(dataset_streaming=True, shuffle_buffer=8), tmp_path / "s", resume=True
    )
    whole = train(base.replace(dataset_streaming=True, shuffle_buffer=8), tmp_path / "w")
    assert resumed.steps == whole.steps == 4
    assert _states_equal(resumed.layer.state_dict(), whole.layer.state_dict())
    # Decoding in worker processes does not change which images make each step.
    stream = base.replace(dataset_streaming=True, shuffle_buffer=8, num_workers=2)
    in_workers = train(stream, tmp_path / "workers")
    assert in_workers.steps == 4
    assert _states_equal(in_workers.layer.state_dict(), whole.layer.state_dict())
    with pytest.raises(ValueError, match="no image column 'picture'"):
        train(base.replace(image_column="picture"), tmp_path / "x")


def test_distributed_two_processes_gloo(tiny_config, tmp_path):
    config = tiny_config.replace(epochs=1, micro_batch_size=2)
    ranks = train_distributed_cpu(config, tmp_path / "ddp", world_size=2)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["seen"] == 32  # global count: each rank trained on its half
    assert _states_equal(ranks[0]["state"], ranks[1]["state"])
    assert (tmp_path / "ddp" / "alignment.safetensors").is_file()
    # The same global batches in one process give the same weights (up to summation order).
    single = train(config, tmp_path / "single")
    for name, value in single.layer.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-6)
    untrained = TrainConfig.from_dict(config.to_dict())  # sanity: config survives the round trip
    assert untrained == config


def test_preprocessing_in_workers_or_in_the_loop_gives_the_same_weights(tiny_config, tmp_path):
    config = tiny_config.replace(epochs=1, eval_images=0)
    in_workers = train(config.replace(preprocess="workers", num_workers=1), tmp_path / "a")
    in_loop = train(config.replace(preprocess="device", num_workers=0), tmp_path / "b")
    assert in_workers.steps == in_loop.steps == 5
    assert _states_equal(in_workers.layer.state_dict(), in_loop.layer.state_dict())


def test_authors_preprocessing_trains_on_the_processors_pixels(tiny_config, tmp_path):
    """``preprocessing=authors`` (the paper preset's): the same weights whether the PIL resize
    runs in the workers or in the loop, other weights than ``exif``, recorded in the file."""
    config = tiny_config.replace(epochs=1, eval_images=4, preprocessing="authors")
    in_workers = train(config.replace(preprocess="workers", num_workers=1), tmp_path / "a")
    in_loop = train(config.replace(preprocess="device", num_workers=0), tmp_path / "b")
    photo = train(config.replace(preprocessing="exif", num_workers=0), tmp_path / "c")
    assert _states_equal(in_workers.layer.state_dict(), in_loop.layer.state_dict())
    assert not _states_equal(in_loop.layer.state_dict(), photo.layer.state_dict())
    assert in_workers.eval is not None and in_loop.eval is not None
    assert in_workers.eval.mse == pytest.approx(in_loop.eval.mse, rel=1e-6)
    provenance = load_alignment(in_loop.weights_path).provenance
    assert provenance["preprocessing"] == "authors"
    assert load_alignment(photo.weights_path).provenance["preprocessing"] == "exif"


def _checkpoint_step(path) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except (ValueError, KeyError, FileNotFoundError):
        return -1


def test_resume_after_sigkill_is_exact(tiny_config, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tiny_config.replace(epochs=12, eval_images=0, checkpoint_every=1)  # 60 steps
    run = tmp_path / "killed"
    run.mkdir()
    (tmp_path / "preset.json").write_text(json.dumps(config.to_dict()))  # beside the run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "jmllm.align.cli", "train", "--preset",
               str(tmp_path / "preset.json"), "--out", str(run)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _checkpoint_step(run / "checkpoint.pt") < 3 and process.poll() is None:
            assert time.monotonic() < deadline, "training never wrote a checkpoint"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    killed_at = _checkpoint_step(run / "checkpoint.pt")
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert 3 <= killed_at < 60
    assert not (run / "alignment.safetensors").exists()
    resumed = train(config, run, resume=True)
    full = train(config, tmp_path / "full")
    assert resumed.steps == full.steps == 60
    assert _states_equal(resumed.layer.state_dict(), full.layer.state_dict())


def test_sigterm_checkpoints_and_returns(tiny_config, tmp_path):
    import os
    import signal
    import threading

    config = tiny_config.replace(epochs=12, eval_images=0, checkpoint_every=0)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def send_sigterm_after_two_steps() -> None:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_after_two_steps, daemon=True).start()
    part = train(config, tmp_path / "run")
    assert part.interrupted and part.weights_path is None and 2 <= part.steps < 60
    assert _checkpoint_step(part.checkpoint_path) == part.steps
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    rest = train(config, tmp_path / "run", resume=True)
    full = train(config, tmp_path / "full")
    assert _states_equal(rest.layer.state_dict(), full.layer.state_dict())


def test_distributed_with_a_rank_left_without_images(tiny_config, image_folder, tmp_path):
    good = sorted(str(p) for p in image_folder.rglob("*.png"))[:8]
    for i in range(8):
        (tmp_path / f"bad{i}.jpg").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(good + [f"bad{i}.jpg" for i in range(8)]))
    # One image per rank and step, half of them unreadable: some steps leave one rank empty.
    config = tiny_config.replace(images=[str(listing)], batch_size=2, epochs=1, eval_images=0)
    ranks = train_distributed_cpu(config, tmp_path / "ddp", world_size=2)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8
    assert ranks[0]["seen"] == 8
    assert _states_equal(ranks[0]["state"], ranks[1]["state"])
    provenance = load_alignment(tmp_path / "ddp" / "alignment.safetensors").provenance
    assert provenance["images_skipped"] == 8 and provenance["world_size"] == 2


def test_a_dataset_without_the_datasets_extra_is_one_line_naming_it(monkeypatch, tiny_config):
    import sys

    from jmllm.align.train.sources import _load_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"^training from a dataset needs the datasets package: "):
        _load_dataset(tiny_config.replace(dataset="imagefolder"))
    with pytest.raises(ImportError, match=r"pip install 'jmllm-align\[datasets\]'$"):
        _load_dataset(tiny_config.replace(dataset="imagefolder"))


def test_the_tiny_models_without_tokenizers_name_the_extra(monkeypatch):
    import sys

    from jmllm.align.testing import require_tokenizers

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install 'jmllm-align\[testing\]'$"):
        require_tokenizers()


def test_training_w_for_owlv2(tiny, tiny_config, tmp_path):
    """W's source can be OWLv2 (picked from its config): its t is OWLv2's penultimate state of
    the image as its own processor pads and resizes it, its 8x8 grid resampled onto the tiny
    LLaVA's 6x6; a few steps train and save a W that J loads with OWLv2."""
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    from jmllm.align import image_to_tensor
    from jmllm.align.features import FeatureExtractor, PaddedSquareNormalization
    from jmllm.align.testing import build_tiny_owlv2, generated_images

    owl = build_tiny_owlv2(tiny.root)
    fx = FeatureExtractor.from_pretrained(owl, tiny.llava)
    assert isinstance(fx.owl_norm, PaddedSquareNormalization) and fx.owl_grid == (8, 8)
    image = generated_images(1, size=64, seed=2)[0].resize((100, 60))
    pair = fx([image_to_tensor(image)])
    assert pair.source.shape == (1, 65, 32) and pair.source_patches.shape == (1, 36, 32)
    stock = Owlv2ForObjectDetection.from_pretrained(owl).eval()
    pixels = AutoProcessor.from_pretrained(owl)(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = stock.owlv2.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(pair.source, hidden, rtol=0, atol=1e-5)
    config = tiny_config.replace(source_model=str(owl), max_steps=3)
    result = train(config, tmp_path / "run")
    assert result.steps == 3 and result.eval is not None
    layer = load_alignment(result.weights_path)
    assert layer.config.in_dim == 32 and layer.provenance["source_model"] == str(owl)
