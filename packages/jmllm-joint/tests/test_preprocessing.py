"""J's image preprocessing by name: ``authors`` feeds both models the Hugging Face processors'
pixels of the stored image (as the authors' scripts did), ``exif`` turns photos upright."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jmllm.align import llava_image_tokens, owl_penultimate
from jmllm.joint.model import JointModelError


@pytest.fixture(scope="module")
def rotated_photo(tmp_path_factory, sample_images):
    """A non-square JPEG whose EXIF orientation (6) says: turn 90° clockwise to display."""
    path = tmp_path_factory.mktemp("exif") / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    sample_images[2].save(path, exif=exif, quality=95)
    return path


def test_authors_embeds_the_processors_pixels_of_the_stored_image(
    tiny_joint, tiny_joint_paths, rotated_photo
):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    with Image.open(rotated_photo) as im:
        stored = im.convert("RGB")  # the authors' Image.open(path).convert("RGB")
    owl = OwlViTImageProcessorPil.from_pretrained(tiny_joint_paths.owl)
    clip = CLIPImageProcessorPil.from_pretrained(tiny_joint_paths.llava)
    emb = tiny_joint.embed(rotated_photo, preprocessing="authors")
    assert emb.preprocessing == "authors" and emb.image_sizes == [stored.size]
    with torch.no_grad():
        t = owl_penultimate(tiny_joint.owl, owl(images=stored, return_tensors="pt").pixel_values)
        stock = llava_image_tokens(
            tiny_joint.llava, clip(images=stored, return_tensors="pt").pixel_values
        )
    assert torch.equal(emb.t, t)
    assert torch.equal(tiny_joint.stock_image_tokens(emb), stock)
    # the default (exif) turns the photo: other size, other pixels, other t
    upright = tiny_joint.embed(rotated_photo)
    assert upright.preprocessing == "exif"
    assert upright.image_sizes == [(stored.height, stored.width)]
    assert np.array_equal(
        np.asarray(upright.pil_image(0)), np.asarray(stored.transpose(Image.Transpose.ROTATE_270))
    )
    assert not torch.allclose(upright.t, emb.t, atol=1e-3)
    # an upright image: only the resize differs — by a few grey levels of the pixels
    plain = tiny_joint.embed(stored)
    assert not torch.equal(plain.t, emb.t)
    pixels = [plain.images[0]]
    torch_resized = tiny_joint.owl_norm(pixels, "cpu", "exif")
    pil_resized = tiny_joint.owl_norm(pixels, "cpu", "authors")
    grey_levels = (torch_resized - pil_resized).abs().max() * max(owl.image_std) * 255
    assert 0 < grey_levels < 40
    with pytest.raises(JointModelError, match="unknown preprocessing 'pil'"):
        tiny_joint.embed(stored, preprocessing="pil")


def test_generate_and_detect_embed_images_with_the_preprocessing_named(tiny_joint, rotated_photo):
    authors = tiny_joint.embed(rotated_photo, preprocessing="authors")
    detections = tiny_joint.detect(rotated_photo, ["cat"], threshold=0.0, preprocessing="authors")
    assert detections[0].image_size == authors.image_sizes[0]
    expected = tiny_joint.generate(authors, "What is it?", max_new_tokens=3)[0].token_ids
    answer = tiny_joint.generate(
        rotated_photo, "What is it?", max_new_tokens=3, preprocessing="authors"
    )[0]
    assert torch.equal(answer.token_ids, expected)
    conversation = tiny_joint.chat(
        rotated_photo, "What is it?", max_new_tokens=3, preprocessing="authors"
    )
    assert torch.equal(conversation.last_answer.token_ids, expected)
