import json
import os
from pathlib import Path

import pytest
from PIL import Image

from jmllm.bias import generate as gen
from jmllm.bias.cohorts import parse_spec
from jmllm.bias.errors import BiasInputError
from jmllm.bias.files import sha256_file

SPEC = parse_spec(
    {
        "name": "mini",
        "template": "A headshot of a {subject} in his 40s, DSLR",
        "groups": [
            {"name": "female", "subject": "woman", "images": 2},
            {"name": "male", "subject": "man", "images": 2},
        ],
        "base_seed": 7,
    }
)


def _config(tiny_sdxl, steps=5):
    return gen.GenerationConfig(
        base=str(tiny_sdxl.base), refiner=str(tiny_sdxl.refiner), steps=steps
    )


@pytest.fixture
def unet_calls(monkeypatch):
    """Count the UNet forward passes of the base and of the refiner."""
    calls = {"base": 0, "refiner": 0}
    real = gen._load_pipelines

    def counting(cfg, device):
        base, refiner, dtype = real(cfg, device)
        base.unet.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1))
        refiner.unet.register_forward_hook(
            lambda *a: calls.__setitem__("refiner", calls["refiner"] + 1)
        )
        return base, refiner, dtype

    monkeypatch.setattr(gen, "_load_pipelines", counting)
    return calls


def test_cohort_end_to_end_then_resume(tiny_sdxl, tmp_path, unet_calls) -> None:
    out = tmp_path / "cohort"
    run = gen.generate_cohort(SPEC, out, _config(tiny_sdxl))
    assert (run.planned, run.generated, run.kept) == (4, 4, 0)
    # ensemble of experts: 5 steps at 0.8 -> base 4 steps, refiner 1 step, per image
    assert unet_calls == {"base": 4 * 4, "refiner": 4 * 1}

    lines = (out / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["image_id"] for r in records] == ["female_000", "female_001", "male_000", "male_001"]
    for r in records:
        path = out / r["file"]
        assert sha256_file(path) == r["sha256"]
        with Image.open(path) as im:
            assert im.size == (64, 64) == (r["width"], r["height"])
            assert im.info["prompt"] == r["prompt"]
        assert r["base_model"] == str(tiny_sdxl.base)
        assert r["refiner_model"] == str(tiny_sdxl.refiner)
        assert (r["steps"], r["high_noise_frac"], r["dtype"]) == (5, 0.8, "float32")
    assert [r["seed"] for r in records] == [7, 8, 100_007, 100_008]
    assert records[0]["prompt"] == "A headshot of a woman in his 40s, DSLR"
    assert records[2]["prompt"] == "A headshot of a man in his 40s, DSLR"
    files = sorted(str(p.relative_to(out)) for p in (out / "images").rglob("*.png"))
    assert files == sorted(r["file"] for r in records)
    # different seeds give different pixels
    assert len({r["sha256"] for r in records}) == 4
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * 64 and sheet.height > 2 * 64
    assert json.loads((out / "cohort.json").read_text())["spec"]["name"] == "mini"

    # rerun: nothing regenerated, no model loaded, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    unet_calls.update(base=0, refiner=0)
    again = gen.generate_cohort(SPEC, out, _config(tiny_sdxl))
    assert (again.generated, again.kept) == (0, 4)
    assert unet_calls == {"base": 0, "refiner": 0}
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}

    # a deleted image and a corrupted one are regenerated, and come back identical (fixed seed)
    original_hash = {r["image_id"]: r["sha256"] for r in records}
    (out / "images/female/female_001.png").unlink()
    (out / "images/male/male_000.png").write_bytes(b"not a png")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"image_id": "torn')  # an interrupted append
    third = gen.generate_cohort(SPEC, out, _config(tiny_sdxl))
    assert sorted(third.generated_ids) == ["female_001", "male_000"]
    assert third.kept == 2
    for r in gen.read_manifest(out).values():
        assert r.sha256 == original_hash[r.image_id] == sha256_file(out / r.file)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4  # compacted, torn line gone


def test_changed_settings_regenerate(tiny_sdxl, tmp_path) -> None:
    spec = SPEC.with_images_per_group(1)
    out = tmp_path / "cohort"
    gen.generate_cohort(spec, out, _config(tiny_sdxl, steps=3), contact_sheet=False)
    run = gen.generate_cohort(spec, out, _config(tiny_sdxl, steps=4), contact_sheet=False)
    assert run.generated == 2
    assert {e.steps for e in gen.read_manifest(out).values()} == {4}


def test_generation_config_validation() -> None:
    cfg = gen.GenerationConfig()
    assert (cfg.base, cfg.refiner) == (gen.SDXL_BASE, gen.SDXL_REFINER)
    assert (cfg.steps, cfg.base_steps) == (50, 40)
    with pytest.raises(BiasInputError, match="high-noise-frac"):
        gen.GenerationConfig(high_noise_frac=1.0)
    with pytest.raises(BiasInputError, match="leaves the base or the refiner no step"):
        gen.GenerationConfig(steps=2, high_noise_frac=0.1)
    with pytest.raises(BiasInputError, match="multiple of 8"):
        gen.GenerationConfig(height=100)


def test_unloadable_model_is_a_clear_error(tmp_path) -> None:
    cfg = gen.GenerationConfig(base=str(tmp_path / "no-such-model"), refiner=str(tmp_path))
    with pytest.raises(BiasInputError, match="no-such-model: cannot load the SDXL base"):
        gen.generate_cohort(SPEC.with_images_per_group(1), tmp_path / "out", cfg)


def test_output_path_that_is_a_file(tmp_path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(BiasInputError, match="not a folder"):
        gen.generate_cohort(SPEC, target, gen.GenerationConfig())
    assert os.path.isfile(Path(target))


@pytest.mark.slow
@pytest.mark.xdist_group("torch-distributed-port")  # torchrun's default port
def test_two_processes_split_the_cohort(tiny_sdxl, tmp_path) -> None:
    """torchrun with 2 CPU processes: each makes its share, the manifest holds each image once."""
    import subprocess
    import sys

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC.with_images_per_group(3).to_dict()))
    out = tmp_path / "cohort"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "jmllm.bias", "cohort", "--spec", str(spec), "--out", str(out),
           "--base", str(tiny_sdxl.base), "--refiner", str(tiny_sdxl.refiner), "--denoising-steps", "3"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 generated, 0 kept, 6 planned" in done.stdout
    # both processes worked
    assert "[process 0]" in done.stderr and "[process 1]" in done.stderr
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in records) == sorted(im.image_id for im in
                                                           SPEC.with_images_per_group(3).plan())  # fmt: skip
    for r in records:
        assert sha256_file(out / r["file"]) == r["sha256"]
    # same pixels as one process makes: per-image seeds, not per-process streams
    single = gen.generate_cohort(
        SPEC.with_images_per_group(3), tmp_path / "single", _config(tiny_sdxl, steps=3),
        contact_sheet=False,
    )  # fmt: skip
    assert {e.image_id: e.sha256 for e in gen.read_manifest(single.out).values()} == {
        r["image_id"]: r["sha256"] for r in records
    }


def test_batched_generation_keeps_each_image_its_seed(tiny_sdxl, tmp_path) -> None:
    import numpy as np

    spec = SPEC.with_images_per_group(1)
    one = tmp_path / "one"
    two = tmp_path / "two"
    gen.generate_cohort(spec, one, _config(tiny_sdxl, steps=3), contact_sheet=False)
    cfg = gen.GenerationConfig(
        base=str(tiny_sdxl.base), refiner=str(tiny_sdxl.refiner), steps=3, batch_size=2
    )
    assert gen.generate_cohort(spec, two, cfg, contact_sheet=False).generated == 2
    for image in spec.plan():
        a = np.asarray(Image.open(one / image.relpath), dtype=np.int16)
        b = np.asarray(Image.open(two / image.relpath), dtype=np.int16)
        assert np.abs(a - b).max() <= 2  # batching may change float rounding, not the image
