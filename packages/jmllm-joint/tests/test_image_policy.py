"""The image policy (jmllm.align.images) on every jmllm-joint path that opens an image: bombs
refused from the header, camera-size photos shrunk once with boxes in original pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jmllm.align.testing import png_claiming
from jmllm.joint import cli

QUESTION = "What's in the image?"
ANSWER = "The image shows a bird near a house"

OPENS_IMAGES = {
    "describe": ["describe", "{image}", "--tiny", "--max-new-tokens", "2"],
    "chat": ["chat", "{image}", "--tiny", "-p", "Hi?", "--max-new-tokens", "2", "-q", "cat",
             "--out", "{out}"],
    "detect": ["detect", "{image}", "--tiny", "-q", "cat", "--out", "{out}"],
    "explain": ["explain", "{image}", "--tiny", "-p", QUESTION, "--answer", ANSWER, "-q", "bird",
                "--out", "{out}"],
    "hallucinations": ["hallucinations", "{image}", "--tiny", "-p", QUESTION, "--answer", ANSWER,
                       "--out", "{out}"],
}  # fmt: skip


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 6000 x 4000 JPEG, the size of a 24-megapixel camera's photos."""
    rng = np.random.default_rng(5)
    small = Image.fromarray(rng.integers(0, 255, (24, 36, 3), dtype=np.uint8))
    path = tmp_path_factory.mktemp("photo") / "camera.jpg"
    small.resize((6000, 4000), Image.Resampling.BICUBIC).save(path, quality=85)
    return path


def _argv(command: str, **values: object) -> list[str]:
    return [a.format(**values) for a in OPENS_IMAGES[command]]


@pytest.mark.parametrize("command", list(OPENS_IMAGES))
def test_bomb_is_refused_from_its_header_by_every_command(command, cli_env, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(28_000, 28_000))
    code = cli.main(_argv(command, image=bomb, out=tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{bomb}: image too large: 28000x28000 pixels" in lines[0]
    assert not (tmp_path / "out").exists()


def test_wsol_skips_and_counts_a_bomb(cli_env, sample_images, tmp_path, capsys):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    sample_images[0].save(root / "images" / "ok.png")
    (root / "images" / "bomb.png").write_bytes(png_claiming(28_000, 28_000))
    (root / "boxes.csv").write_text("image_id,x0,y0,x1,y1\nok.png,2,2,30,30\nbomb.png,1,1,9,9\n")
    code = cli.main(["wsol", str(root), "--tiny", "--json-out", str(tmp_path / "w.json")])
    capsys.readouterr()
    report = json.loads((tmp_path / "w.json").read_text())
    assert code == 3 and report["num_images"] == 1
    assert "image too large" in report["skipped"]["bomb.png"]


@pytest.mark.parametrize("command", ["detect", "chat"])
def test_camera_photo_detections_are_in_original_pixels(command, photo, cli_env, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main([*_argv(command, image=photo, out=out), "--threshold", "0"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "result.json").read_text())
    assert record["image_size"] == [6000, 4000]
    boxes = np.array([d["box"] for d in record["detections"]])
    assert len(boxes) and boxes.min() >= 0
    assert boxes[:, 0::2].max() <= 6000 and boxes[:, 1::2].max() <= 4000
    assert boxes[:, 2].max() > 4096  # original pixels, not the 4096-px working copy's
    with Image.open(out / "detections.png") as drawn:
        assert drawn.size == (4096, 2731)  # drawn once on the working copy
    assert (out / "report.html").is_file()


def test_boxes_are_the_working_copys_mapped_back(tiny_joint, photo):
    """The photo and its own 4096-px working copy give the same t; the photo's boxes are the
    copy's scaled by 6000/4096 and 4000/2731 — exactly what mapping back means."""
    from jmllm.align.images import open_image

    working = open_image(photo).image
    big, copy = tiny_joint.embed([photo]), tiny_joint.embed([working])
    assert big.image_sizes == [(6000, 4000)] and copy.image_sizes == [(4096, 2731)]
    assert torch.equal(big.t, copy.t)
    a = tiny_joint.detect(big, ["cat", "dog"], threshold=0.0)[0]
    b = tiny_joint.detect(copy, ["cat", "dog"], threshold=0.0)[0]
    scale = torch.tensor([6000 / 4096, 4000 / 2731] * 2)
    assert torch.equal(a.patches, b.patches)
    torch.testing.assert_close(a.boxes, b.boxes * scale, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("command", ["explain", "hallucinations"])
def test_camera_photo_explanations(command, photo, cli_env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(command, image=photo, out=out)
    if command == "explain":
        argv += ["--token", "bird"]  # one word: the maps are painted at 6000 x 4000
    code = cli.main(argv)
    assert code == 0, capsys.readouterr().err
    name = "report.html" if command == "explain" else "hallucinations.html"
    assert (out / name).stat().st_size > 1000
    if command == "hallucinations":
        record = json.loads((out / "hallucinations.json").read_text())
        for obj in record["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 <= x1 <= 6000 and 0 <= y0 <= y1 <= 4000
