from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jmllm.align.features import (
    ImageLoadError,
    ImageNormalization,
    image_to_tensor,
    llava_image_tokens,
    load_image,
    owl_penultimate,
)
from jmllm.align.testing import generated_images


@pytest.fixture(scope="module")
def images():
    return [image_to_tensor(im) for im in generated_images(3, size=50, seed=3)]


def test_source_is_penultimate_hidden_state_of_the_full_vision_model(fx, images):
    pixels = fx.owl_norm(images)
    with torch.no_grad():
        full = fx.owl.owlvit.vision_model(pixel_values=pixels, output_hidden_states=True)
        t = owl_penultimate(fx.owl, pixels)
    assert t.shape == (3, 37, 32)  # CLS + 6x6 patches
    torch.testing.assert_close(t, full.hidden_states[-2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(t, full.hidden_states[-1], atol=1e-3)  # really the penultimate


def test_target_is_what_llava_itself_feeds_its_language_model(fx, images):
    pixels = fx.llava_norm(images)
    with torch.no_grad():
        ours = llava_image_tokens(fx.llava, pixels)
        config = fx.llava.config
        theirs = fx.llava.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    theirs = theirs.pooler_output if hasattr(theirs, "pooler_output") else theirs
    theirs = torch.stack(list(theirs))
    assert ours.shape == (3, 36, 48)  # CLS dropped, projected to the LM width
    torch.testing.assert_close(ours, theirs)
    pair = fx(images)
    assert pair.source_patches.shape == (3, 36, 32)
    torch.testing.assert_close(pair.target, ours)


def test_extractor_without_language_model_matches_the_full_llava(fx, tiny, images):
    from transformers import LlavaForConditionalGeneration

    full = LlavaForConditionalGeneration.from_pretrained(tiny.llava).eval()
    assert full.model.language_model.layers  # the full model has its decoder layers
    assert isinstance(fx.llava.model.language_model, torch.nn.Identity)  # ours never loaded them
    pixels = fx.llava_norm(images)
    with torch.no_grad():
        theirs = full.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=full.config.vision_feature_layer,
            vision_feature_select_strategy=full.config.vision_feature_select_strategy,
        ).pooler_output
    torch.testing.assert_close(fx.target(images), torch.stack(list(theirs)), rtol=0, atol=0)


def test_whole_image_is_squashed_not_centre_cropped():
    wide = np.zeros((100, 200, 3), dtype=np.uint8)
    wide[:, :50] = (255, 0, 0)  # left quarter red
    wide[:, 50:] = (0, 0, 255)
    norm = ImageNormalization(size=84, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = norm([image_to_tensor(Image.fromarray(wide))])[0]  # (3, 84, 84) in [0, 1]
    assert out.shape == (3, 84, 84)
    red_columns = (out[0, 42] > 0.5).float()
    assert red_columns[0] == 1 and red_columns[-1] == 0  # a centre crop would lose the red
    assert red_columns.sum().item() == pytest.approx(84 / 4, abs=1)


def test_normalisation_uses_mean_and_std():
    grey = torch.full((3, 10, 10), 128, dtype=torch.uint8)
    norm = ImageNormalization(size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    out = norm([grey])
    expected = torch.tensor([(128 / 255 - 0.5) / 0.5, (128 / 255 - 0.25) / 0.25, 128 / 255])
    torch.testing.assert_close(out[0, :, 4, 4], expected, rtol=1e-4, atol=1e-4)


def _processor_test_images():
    """Photo-like and adversarial 8-bit images of several shapes (noise has the most edges)."""
    rng = np.random.default_rng(7)
    shapes = [(480, 640), (333, 500), (97, 1200), (768, 768), (21, 13)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    ramp = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
    images.append(Image.fromarray(ramp.astype(np.uint8)))
    images.extend(generated_images(2, size=300, seed=11))
    return images


def test_authors_preprocessing_gives_the_hf_processors_pixels_bit_for_bit():
    """``authors``: OWL-ViT's and CLIP's image processors (PIL backend, the authors' settings:
    OWL-ViT 768 px, LLaVA's CLIP 336 px without centre crop) give exactly the same float32."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    owl = OwlViTImageProcessorPil()
    clip = CLIPImageProcessorPil(
        size={"height": 336, "width": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=False,
    )
    pairs = [
        (owl, ImageNormalization(768, tuple(owl.image_mean), tuple(owl.image_std))),
        (clip, ImageNormalization(336, tuple(clip.image_mean), tuple(clip.image_std))),
    ]
    images = _processor_test_images()
    for processor, norm in pairs:
        theirs = processor(images=images, return_tensors="pt")["pixel_values"]
        ours = norm([image_to_tensor(im) for im in images], preprocessing="authors")
        assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(ours, theirs)
        # the exif preprocessing resizes with torch: close, never equal on these images
        torch_resized = norm([image_to_tensor(im) for im in images])
        assert not torch.equal(torch_resized, theirs)
        assert (torch_resized - theirs).abs().max() < 0.1  # a few grey levels at most


def test_feature_extractor_authors_preprocessing_feeds_the_processors_pixels(tiny):
    """W's features under ``authors``: both encoders see what their saved processors produce
    (the tiny checkpoints' processors, loaded as the authors loaded theirs)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    from jmllm.align.features import FeatureExtractor

    fx = FeatureExtractor.from_pretrained(tiny.owl, tiny.llava, preprocessing="authors")
    owl = OwlViTImageProcessorPil.from_pretrained(tiny.owl)
    clip = CLIPImageProcessorPil.from_pretrained(tiny.llava)
    images = generated_images(2, size=50, seed=5)
    tensors = [image_to_tensor(im) for im in images]
    with torch.no_grad():
        owl_pixels = owl(images=images, return_tensors="pt")["pixel_values"]
        expected_t = fx.owl.owlvit.vision_model(
            pixel_values=owl_pixels, output_hidden_states=True
        ).hidden_states[-2]
        clip_pixels = clip(images=images, return_tensors="pt")["pixel_values"]
        expected_tokens = llava_image_tokens(fx.llava, clip_pixels)
    assert torch.equal(fx.owl_norm(tensors, preprocessing="authors"), owl_pixels)
    assert torch.equal(fx.llava_norm(tensors, preprocessing="authors"), clip_pixels)
    torch.testing.assert_close(fx.source(tensors), expected_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fx.target(tensors), expected_tokens, rtol=0, atol=0)


def _save(image: Image.Image, fmt: str, tmp_path, name: str):
    path = tmp_path / name
    image.save(path, fmt)
    return path


def test_odd_modes_become_rgb(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG", tmp_path, "cmyk.jpg")
    assert load_image(cmyk).mode == "RGB"
    assert load_image(cmyk).getpixel((4, 3))[0] > 200  # cyan-free, magenta+yellow: red

    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent -> white background
    assert load_image(_save(la, "PNG", tmp_path, "la.png")).getpixel((0, 0)) == (255, 255, 255)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert load_image(_save(rgba, "PNG", tmp_path, "rgba.png")).getpixel((1, 1)) == (255, 0, 0)

    p = Image.new("P", (4, 4), 3)
    p.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    assert load_image(_save(p, "PNG", tmp_path, "p.png")).getpixel((0, 0)) == (10, 200, 30)

    sixteen = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    loaded = load_image(_save(sixteen, "PNG", tmp_path, "deep.png"))
    assert loaded.getpixel((1, 1)) == (255, 255, 255)  # scaled by its maximum
    assert loaded.getpixel((0, 1))[0] == 128


def test_one_pixel_image_goes_through_the_models(fx, tmp_path):
    path = _save(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG", tmp_path, "dot.png")
    pair = fx([image_to_tensor(load_image(path))])
    assert pair.source.shape == (1, 37, 32) and pair.target.shape == (1, 36, 48)
    assert torch.isfinite(pair.target).all()


def test_truncated_corrupt_and_missing_files_are_named(tmp_path):
    buffer = io.BytesIO()
    generated_images(1, size=64)[0].save(buffer, "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(ImageLoadError, match=r"cut\.png: not a readable image"):
        load_image(truncated)
    buffer = io.BytesIO()
    generated_images(1, size=64)[0].save(buffer, "JPEG")
    cut_jpeg = tmp_path / "cut.jpg"
    cut_jpeg.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg"):
        load_image(cut_jpeg)
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    with pytest.raises(ImageLoadError, match=r"text\.jpg: not a readable image"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="no such image file"):
        load_image(tmp_path / "absent.png")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_unreadable_images_do_not_keep_their_files_open(tmp_path):
    """A long dataset with many bad files must not run out of file handles."""
    buffer = io.BytesIO()
    generated_images(1, size=64)[0].save(buffer, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buffer.getvalue()[:100])
    before = len(list(Path("/proc/self/fd").iterdir()))
    kept = []  # the errors stay alive, as in a skip log: they must not hold the files
    for _ in range(20):
        with pytest.raises(ImageLoadError) as error:
            load_image(cut)
        kept.append(error)
    assert len(list(Path("/proc/self/fd").iterdir())) == before
