"""The toy J's check that an image is a toy scene (a photo gets a warning, not a pretence)."""

from __future__ import annotations

import logging
from importlib.resources import files

import numpy as np
import pytest
from PIL import Image

from jmllm.joint.toy.inputs import off_palette_share, toy_image_problem, toy_input_check
from jmllm.joint.toy.scenes import COLOURS, make_scene


def _reference_share(image: Image.Image) -> float:
    """Straightforward per-pixel loop of the documented rule."""
    count = 0
    pixels = [tuple(int(v) for v in px) for px in np.asarray(image.convert("RGB")).reshape(-1, 3)]
    for r, g, b in pixels:
        coloured = max(r, g, b) - min(r, g, b) > 40
        far = all(
            ((r - c[0]) ** 2 + (g - c[1]) ** 2 + (b - c[2]) ** 2) ** 0.5 > 60
            for c in COLOURS.values()
        )
        count += coloured and far
    return count / len(pixels)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_toy_scenes_pass(split):
    for index in range(60):
        assert toy_image_problem(make_scene(split, index).image) is None


def test_photos_and_other_sizes_are_flagged():
    photo = Image.open(str(files("jmllm.joint") / "data" / "sample.png")).convert("RGB")
    assert "not a 128 × 128 toy scene" in toy_image_problem(photo)
    small = photo.resize((128, 128))  # the right size, the wrong world
    assert "colours no toy scene has" in toy_image_problem(small)
    assert off_palette_share(np.asarray(small)) == pytest.approx(_reference_share(small))
    assert toy_image_problem(Image.new("RGB", (128, 128), (128, 128, 128))) is None
    # a working copy (C, H, W) with its original size
    tensor = np.transpose(np.asarray(small), (2, 0, 1))
    assert "640 × 480" in toy_image_problem(tensor, (640, 480))


def test_the_toy_j_warns_in_embed_and_random_models_do_not(tiny_joint, caplog):
    from jmllm.joint.toy import load_toy_joint

    photo = Image.new("RGB", (200, 100), (200, 30, 200))
    toy = load_toy_joint()
    assert toy.input_check is toy_input_check
    with caplog.at_level(logging.WARNING):
        toy.embed([make_scene("heldout", 3).image])
        assert not caplog.records
        toy.embed([make_scene("heldout", 3).image, photo])
    assert len(caplog.records) == 1 and "image 1: 200 × 100 pixels" in caplog.text
    caplog.clear()
    tiny_joint.embed([photo])  # models without a check stay silent
    assert not caplog.records
