"""The toy J's check that an image is a toy scene (a photo gets a warning, not a pretence)."""

from __future__ import annotations

import io
import logging
from importlib.resources import files

import numpy as np
import pytest
from PIL import Image, ImageFilter

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


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


SAVED_AS = {
    "png": lambda im: im,
    "jpeg95": lambda im: _jpeg(im, 95),
    "jpeg75": lambda im: _jpeg(im, 75),
    "blur1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
}


@pytest.mark.parametrize("saved", list(SAVED_AS))
def test_toy_scenes_pass_as_png_jpeg_and_lightly_blurred(saved):
    """No false alarm on toy scenes a user saved as JPEG (quality 95 or 75) or blurred by 1 px
    (the documented rate is 0 of 500 each; 200 here, from both splits)."""
    flagged = [
        (split, index)
        for split in ("train", "heldout")
        for index in range(100)
        if toy_image_problem(SAVED_AS[saved](make_scene(split, index).image)) is not None
    ]
    assert flagged == []


def test_blank_and_desaturated_images_are_flagged():
    for grey in (0, 64, 128, 200, 255):
        problem = toy_image_problem(Image.new("RGB", (128, 128), (grey, grey, grey)))
        assert problem is not None and "no object" in problem
    for index in range(20):  # a toy scene without its colours is not a toy scene either
        desaturated = make_scene("heldout", index).image.convert("L").convert("RGB")
        assert "no object" in toy_image_problem(desaturated)


def _photo_crops(count: int) -> list[Image.Image]:
    """128 × 128 crops of the package's sample photo at many scales (the right size, the wrong
    world), and smooth random colour fields."""
    photo = Image.open(str(files("jmllm.joint") / "data" / "sample.png")).convert("RGB")
    rng = np.random.default_rng(0)
    crops = []
    width, height = photo.size
    for _ in range(count):
        side = int(rng.integers(min(width, height) // 6, min(width, height)))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crops.append(photo.crop((x, y, x + side, y + side)).resize((128, 128)))
        field = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        crops.append(Image.fromarray(field, "RGB").resize((128, 128), Image.Resampling.BICUBIC))
    return crops


def test_photos_and_other_sizes_are_flagged():
    photo = Image.open(str(files("jmllm.joint") / "data" / "sample.png")).convert("RGB")
    assert "not a 128 × 128 toy scene" in toy_image_problem(photo)
    passed = [i for i, crop in enumerate(_photo_crops(40)) if toy_image_problem(crop) is None]
    assert passed == []
    small = photo.resize((128, 128))
    assert off_palette_share(np.asarray(small)) == pytest.approx(_reference_share(small))
    # a working copy (C, H, W) with its original size
    tensor = np.transpose(np.asarray(small), (2, 0, 1))
    assert "640 × 480" in toy_image_problem(tensor, (640, 480))


@pytest.fixture(scope="module")
def toy_j():
    from jmllm.joint.toy import load_toy_joint

    return load_toy_joint()


def _beyond(scenes_wanted: int, **kwargs) -> list:
    """Scenes the toy world never shows (more objects, other sizes); crowded draws that find no
    room are skipped."""
    scenes, index = [], 5000
    while len(scenes) < scenes_wanted:
        try:
            scenes.append(make_scene("heldout", index, **kwargs))
        except ValueError:
            pass
        index += 1
    return scenes


def test_answers_the_detector_contradicts_are_flagged(toy_j):
    """Four objects pass the image check (toy-like pixels), but J names three or fewer: its
    answer and the detector's count disagree, and the check says so. On scenes of the toy
    world, a caption that names its objects right is not flagged."""
    from jmllm.joint.toy.inputs import toy_answer_check
    from jmllm.joint.toy.scenes import CONTENT_QUESTION, caption_correct

    crowded = _beyond(12, count=4)
    assert all(toy_image_problem(scene.image) is None for scene in crowded)
    emb = toy_j.embed([scene.image for scene in crowded])
    answers = [a.text for a in toy_j.generate(emb, CONTENT_QUESTION, max_new_tokens=32)]
    problems = toy_answer_check(toy_j, emb, answers)
    flagged = sum(p is not None for p in problems)
    assert flagged >= 10, list(zip(answers, problems, strict=True))
    assert all("detector sees" in p for p in problems if p)
    scenes = [make_scene("heldout", index) for index in range(40)]
    emb = toy_j.embed([scene.image for scene in scenes])
    answers = [a.text for a in toy_j.generate(emb, CONTENT_QUESTION, max_new_tokens=32)]
    right = [
        p for p, a, s in zip(toy_answer_check(toy_j, emb, answers), answers, scenes, strict=True)
        if caption_correct(a, s.objects)
    ]  # fmt: skip
    assert len(right) >= 30 and sum(p is not None for p in right) <= 1
    # an answer that names no object is not checked
    assert toy_answer_check(toy_j, toy_j.embed([scenes[0].image]), ["blue"]) == [None]


def test_the_toy_j_warns_in_embed_and_random_models_do_not(tiny_joint, caplog):
    photo = Image.new("RGB", (200, 100), (200, 30, 200))
    from jmllm.joint.toy import load_toy_joint

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
