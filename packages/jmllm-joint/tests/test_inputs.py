"""Bad and odd input: a one-line error naming the input, or a documented conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jmllm.align import AlignmentConfig, AlignmentLayer, save_alignment
from jmllm.align.weights import AlignmentWeightsError
from jmllm.joint import JointModel, JointModelError


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("LA").save(folder / "la.png")
    rgb.convert("P").save(folder / "p.png", transparency=0)
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)).save(
        folder / "i16.png"
    )
    rgb.resize((1, 1)).save(folder / "one.png")
    rgb.resize((5000, 30)).save(folder / "wide.png")
    rgb.save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    return folder


@pytest.mark.parametrize("name", ["cmyk.jpg", "la.png", "p.png", "rgba.png", "i16.png"])
def test_odd_modes_are_converted(tiny_joint, odd_images, name):
    emb = tiny_joint.embed([odd_images / name])
    assert emb.t.shape == (1, 37, 32) and torch.isfinite(emb.t).all()
    assert emb.image_sizes == [(50, 40)]
    assert emb.images[0].shape == (3, 40, 50)


def test_transparent_pixels_become_white(tiny_joint, tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    emb = tiny_joint.embed([tmp_path / "clear.png"])
    assert emb.images[0].min() == 255


def test_tiny_and_huge_images(tiny_joint, odd_images):
    emb = tiny_joint.embed([odd_images / "one.png", odd_images / "wide.png"])
    assert emb.image_sizes == [(1, 1), (5000, 30)]
    assert max(emb.images[1].shape[1:]) <= 4096  # shrunk before squashing, aspect kept
    tiny, wide = tiny_joint.detect(emb, ["cat"], threshold=0.0)
    assert float(tiny.boxes.max()) <= 1.0 and float(tiny.boxes.min()) >= 0.0
    assert float(wide.boxes[:, 0::2].max()) <= 5000 and float(wide.boxes[:, 1::2].max()) <= 30
    assert float(wide.boxes[:, 0::2].max()) > 1000  # x scaled by the original width


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", "missing.png: no such image file"),
        ("truncated.png", "truncated.png: not a readable image"),
        ("corrupt.jpg", "corrupt.jpg: not a readable image"),
        ("empty.png", "empty.png: not a readable image"),
        ("notes.txt", "notes.txt: not a readable image"),
    ],
)
def test_unreadable_images_name_the_file(tiny_joint, odd_images, name, message):
    with pytest.raises(JointModelError, match=message) as info:
        tiny_joint.embed([odd_images / "good.png", odd_images / name])
    assert "\n" not in str(info.value)


def test_bad_tensors_and_types(tiny_joint):
    with pytest.raises(JointModelError, match=r"image 0: tensor must be \(3, H, W\) uint8"):
        tiny_joint.embed([torch.zeros(3, 8, 8)])
    with pytest.raises(JointModelError, match="unsupported type int"):
        tiny_joint.embed([3])
    with pytest.raises(JointModelError, match="non-empty list"):
        tiny_joint.embed([])


def test_mismatched_alignment_weights_name_file_and_dimension(tiny_joint_paths, tmp_path):
    wrong = AlignmentLayer(
        AlignmentConfig("deep-mlp", in_dim=16, out_dim=48, hidden_dim=8, num_tokens=36)
    )
    path = save_alignment(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(
        JointModelError,
        match=r"wrong\.safetensors: .*input dimension 16 != OWL-ViT vision hidden size 32",
    ):
        JointModel.from_pretrained(tiny_joint_paths.owl, tiny_joint_paths.llava, path, device="cpu")
    wrong = AlignmentLayer(
        AlignmentConfig("deep-mlp", in_dim=32, out_dim=64, hidden_dim=8, num_tokens=36)
    )
    path = save_alignment(wrong, tmp_path / "wide.safetensors")
    with pytest.raises(JointModelError, match="output dimension 64 != LLaVA text hidden size 48"):
        JointModel.from_pretrained(tiny_joint_paths.owl, tiny_joint_paths.llava, path, device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(AlignmentWeightsError, match=r"junk\.safetensors"):
        JointModel.from_pretrained(
            tiny_joint_paths.owl,
            tiny_joint_paths.llava,
            tmp_path / "junk.safetensors",
            device="cpu",
        )


def test_bad_checkpoint_sources(tiny_joint_paths, tmp_path):
    with pytest.raises(JointModelError, match="nowhere: no such OWL-ViT folder"):
        JointModel.from_pretrained(
            tmp_path / "nowhere", tiny_joint_paths.llava, tiny_joint_paths.alignment, device="cpu"
        )
    with pytest.raises(JointModelError, match="cannot load OWL-ViT config"):
        JointModel.from_pretrained(
            tmp_path, tiny_joint_paths.llava, tiny_joint_paths.alignment, device="cpu"
        )
    with pytest.raises(JointModelError, match="not 'owlvit'"):
        JointModel.from_pretrained(
            tiny_joint_paths.llava, tiny_joint_paths.llava, tiny_joint_paths.alignment, device="cpu"
        )
    with pytest.raises(JointModelError, match="alignment: required"):
        JointModel.from_pretrained(tiny_joint_paths.owl, tiny_joint_paths.llava, None)


def test_perturbed_embedding_changes_detections_and_keeps_images(tiny_joint, odd_images):
    emb = tiny_joint.embed([odd_images / "good.png"])
    moved = emb.with_t(emb.t + torch.randn_like(emb.t))
    assert moved.images is emb.images
    a = tiny_joint.detect(emb, ["cat"], threshold=0.0)[0]
    b = tiny_joint.detect(moved, ["cat"], threshold=0.0)[0]
    assert not torch.allclose(a.scores.sort().values, b.scores.sort().values)
    with pytest.raises(JointModelError, match="shape"):
        emb.with_t(emb.t[:, 1:])
