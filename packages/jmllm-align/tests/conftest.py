"""Shared fixtures: tiny encoders built once per session, generated images, a feature extractor."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models on a shared 2-core machine: threads only add contention


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny encoders, built once per test session in the folder every package's tests share
    (the session's base temporary folder: jmllm-joint's tiny J is built over the same ones)."""
    from jmllm.align.testing import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.getbasetemp() / "jmllm-cache" / "tiny")


@pytest.fixture(scope="session")
def fx(tiny):
    from jmllm.align.features import FeatureExtractor

    return FeatureExtractor.from_pretrained(tiny.owl, tiny.llava)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    from jmllm.align.testing import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("images"), 40, size=64, seed=1)


@pytest.fixture
def tiny_config(tiny, image_folder):
    from jmllm.align.train import load_preset

    return load_preset("tiny").replace(
        source_model=str(tiny.owl),
        target_model=str(tiny.llava),
        images=[str(image_folder)],
        progress=False,
    )
