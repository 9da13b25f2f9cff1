"""Shared fixtures: tiny images, a COCO-format annotation file, and the local fake judge server."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jmllm.judge.captions import SystemCaptions
from jmllm.judge.client import JudgeSettings, RetryPolicy
from jmllm.judge.manifest import Manifest, sample_coco
from jmllm.judge.testing import (
    FakeJudgeConfig,
    FakeJudgeServer,
    make_test_images,
    write_coco_captions,
)


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    make_test_images(tmp_path / "images", 12)
    return tmp_path / "images"


@pytest.fixture
def coco_file(tmp_path: Path, images_dir: Path) -> Path:
    return write_coco_captions(tmp_path / "captions_train2017.json", sorted(images_dir.iterdir()))


@pytest.fixture
def manifest(coco_file: Path, images_dir: Path) -> Manifest:
    return sample_coco(coco_file, 8, seed=0, images_dir=images_dir)


@pytest.fixture
def make_captions() -> Callable[[Manifest, str], SystemCaptions]:
    """A system whose caption for each image names the system and the image."""

    def make(manifest: Manifest, name: str) -> SystemCaptions:
        return SystemCaptions(
            name, {im.image_id: f"{name} caption of image {im.image_id}" for im in manifest.images}
        )

    return make


@pytest.fixture
def judge_server() -> Iterator[Callable[..., FakeJudgeServer]]:
    """Start fake judges with a given config; all are closed after the test."""
    servers: list[FakeJudgeServer] = []

    def start(**config: object) -> FakeJudgeServer:
        server = FakeJudgeServer(FakeJudgeConfig(**config)).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def fast_settings() -> Callable[..., JudgeSettings]:
    """Settings for a fake judge: short timeout and backoff, so faults cost little time."""

    def make(server: FakeJudgeServer, **overrides: object) -> JudgeSettings:
        values: dict[str, object] = {
            "model": "fake-judge",
            "base_url": server.base_url,
            "timeout_s": 2.0,
            "concurrency": 8,
            "retry": RetryPolicy(max_attempts=10, base_delay_s=0.02, max_delay_s=0.2),
        }
        values.update(overrides)
        return JudgeSettings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody, root included, can create files in (chmod for users, the immutable
    attribute for root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], check=False).returncode:
        pytest.skip("running as root without chattr +i: no way to make a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=False)
