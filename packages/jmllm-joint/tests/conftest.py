"""Shared fixtures of jmllm-joint's tests (also used by the GA saliency tests in this folder).

The tiny J is built once per test session into a temporary folder and loaded through the same
``JointModel.from_pretrained`` path as real checkpoints. Set ``JMLLM_TEST_CACHE`` to a folder to
reuse the built checkpoints across runs while developing.

Re-training the toy world (``test_toy_world.py::test_recipe_still_learns``, several minutes on
two cores) is off by default; turn it on with ``pytest --toy-retrain`` or the environment
variable ``JMLLM_TOY_RETRAIN=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from jmllm.joint import JointModel
from jmllm.joint.testing import (
    TINY_FAMILIES,
    TinyJoint,
    build_tiny_family_joint,
    build_tiny_joint,
    build_tiny_owlv2_joint,
    generated_images,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--toy-retrain",
        action="store_true",
        default=False,
        help="also re-train the toy world briefly (slow; or set JMLLM_TOY_RETRAIN=1)",
    )
    parser.addoption(
        "--real-shapes",
        action="store_true",
        default=False,
        help="also check J at every family's published shapes (minutes and 3-4 GB each; "
        "or set JMLLM_REAL_SHAPES=1)",
    )


@pytest.fixture(scope="session")
def real_shapes(request: pytest.FixtureRequest) -> None:
    """Skip unless the published-shape checks were asked for (``--real-shapes``)."""
    flag = os.environ.get("JMLLM_REAL_SHAPES", "").strip().lower() in ("1", "true", "yes")
    if not (flag or request.config.getoption("--real-shapes", default=False)):
        pytest.skip("published-shape checks are opt-in: --real-shapes or JMLLM_REAL_SHAPES=1")


@pytest.fixture(scope="session")
def toy_retrain(request: pytest.FixtureRequest) -> bool:
    """Whether the opt-in toy-world re-training test runs."""
    flag = os.environ.get("JMLLM_TOY_RETRAIN", "").strip().lower() in ("1", "true", "yes")
    return flag or bool(request.config.getoption("--toy-retrain", default=False))


@pytest.fixture(scope="session")
def tiny_joint_paths(tmp_path_factory: pytest.TempPathFactory) -> TinyJoint:
    """Folders of the tiny OWL-ViT and LLaVA and the tiny W file."""
    cache = os.environ.get("JMLLM_TEST_CACHE")
    # one folder for the whole session, shared with the other packages' tests (align's tiny
    # encoders, bias's, judge's and userstudy's tiny J): built once, reused by every test
    base = Path(cache) if cache else tmp_path_factory.getbasetemp() / "jmllm-cache"
    # <base>/tiny is where the CLI's --tiny looks when JMLLM_CACHE=<base> (see cli_env)
    return build_tiny_joint(base / "tiny")


@pytest.fixture
def cli_env(tiny_joint_paths: TinyJoint, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the CLI's tiny-checkpoint cache at the session's tiny J (no rebuild)."""
    monkeypatch.setenv("JMLLM_CACHE", str(tiny_joint_paths.root.parent))
    return tiny_joint_paths.root.parent


@pytest.fixture(scope="session")
def tiny_joint(tiny_joint_paths: TinyJoint) -> JointModel:
    """A loaded tiny J (float32, CPU). Shared: tests must not modify it."""
    torch.manual_seed(0)
    return JointModel.from_pretrained(
        tiny_joint_paths.owl, tiny_joint_paths.llava, tiny_joint_paths.alignment, device="cpu"
    )


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def family_joint(request: pytest.FixtureRequest, tiny_joint_paths: TinyJoint) -> JointModel:
    """A loaded tiny J of every supported MLLM family in turn (float32, CPU), through
    ``JointModel.from_pretrained``; LLaVA-1.5's is :func:`tiny_joint`. Shared: do not modify."""
    if request.param == "llava":
        return request.getfixturevalue("tiny_joint")
    paths = build_tiny_family_joint(tiny_joint_paths.root, request.param)
    return JointModel.from_pretrained(paths.owl, paths.llava, paths.alignment, device="cpu")


@pytest.fixture(scope="session")
def owlv2_paths(tiny_joint_paths: TinyJoint) -> TinyJoint:
    """Folders of a tiny J whose vision side is OWLv2 (8x8 grid) with the tiny LLaVA."""
    return build_tiny_owlv2_joint(tiny_joint_paths.root)


@pytest.fixture(scope="session")
def owlv2_joint(owlv2_paths: TinyJoint) -> JointModel:
    """Tiny OWLv2 + tiny LLaVA + a W fitted to them (float32, CPU). Shared: do not modify."""
    return JointModel.from_pretrained(
        owlv2_paths.owl, owlv2_paths.llava, owlv2_paths.alignment, device="cpu"
    )


@pytest.fixture(scope="session")
def toy_joint() -> JointModel:
    """The built-in toy-world J (the shipped weights, CPU, float32), loaded once per session.
    Shared: tests must not modify it."""
    from jmllm.joint.toy import load_toy_joint

    return load_toy_joint()


@pytest.fixture(scope="session")
def sample_images() -> list:
    """Three small RGB PIL images of different sizes (one non-square)."""
    images = generated_images(3, size=64, seed=11)
    images[2] = images[2].resize((120, 48))
    return images
