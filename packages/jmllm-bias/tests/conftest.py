"""Shared fixtures: tiny SDXL, tiny J, a scripted stand-in for J, portrait folders."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The machine's two cores are shared: one thread per test process is much faster than two
# threads fighting other jobs for them.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from jmllm.bias.testing import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_joint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from jmllm.bias.testing import tiny_joint_model

    # the session's one tiny J, shared with the other packages' tests
    return tiny_joint_model(tmp_path_factory.getbasetemp() / "jmllm-cache" / "tiny")


@dataclasses.dataclass
class FakeEmbedding:
    t: torch.Tensor
    image_sizes: list[tuple[int, int]]


@dataclasses.dataclass
class FakeAnswer:
    """J's answer as a scripted raw reply (what follows ``ASSISTANT: ``) and its stripped text."""

    reply: str
    finished: bool = True

    @property
    def text(self) -> str:
        return self.reply.strip()


class ScriptedJoint:
    """Stands in for J where the test needs to choose the answers (parsing, statistics, resume).

    A portrait is recognised by the red value of its top-left pixel; ``answers[red]`` is the
    (original, perturbed) reply pair. The detection head is linear in ``t`` with the two queries
    on disjoint coordinates, so the perturbation's effect is exactly known.
    """

    dim = 8
    patches = 4

    def __init__(self, answers: dict[int, tuple[str, str]]):
        self.answers = answers
        self.embedded: list[int] = []
        self.prompts: list[str] = []
        self.templates: list[str] = []  # the conversation template of every generate call
        self.tokenizations: list[str] = []  # ... and its tokenization
        self.preprocessings: list[str] = []  # the preprocessing of every embed call

    def input_record(self, template: str, tokenization: str, preprocessing: str) -> dict:
        return {
            "template": template,
            "tokenization": tokenization,
            "preprocessing": preprocessing,
            "dtype": "float32",
        }

    def embed(self, images: list[Image.Image], preprocessing: str = "exif") -> FakeEmbedding:
        red = images[0].convert("RGB").getpixel((0, 0))[0]
        self.embedded.append(red)
        self.preprocessings.append(preprocessing)
        t = torch.full((1, 1 + self.patches, self.dim), float(red) / 255.0)
        return FakeEmbedding(t=t, image_sizes=[images[0].size])

    def encode_queries(self, queries: list[str], template: str = "{}") -> torch.Tensor:
        q = torch.zeros(len(queries), self.dim)
        q[0, : self.dim // 2] = 1.0  # original query reads the first half of t
        q[1, self.dim // 2 :] = 1.0  # adversarial query the second half
        return q

    def detection_heads(
        self, t: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = t[:, 1:] @ q.T  # (B, N, 2)
        return logits, torch.zeros(t.shape[0], t.shape[1] - 1, 4)

    def generate(self, emb: FakeEmbedding, prompts: list[str], **kwargs: Any) -> list[FakeAnswer]:
        self.prompts.extend(prompts)
        self.templates.append(kwargs.get("template", "llava-1.5"))  # J's default when omitted
        self.tokenizations.append(kwargs.get("tokenization", "checkpoint"))
        red = round(float(emb.t[0, 0, 0]) * 255.0)
        perturbed = not torch.all(emb.t == emb.t[0, 0, 0])
        original, after = self.answers.get(red, ("5", "5"))
        return [FakeAnswer(after if perturbed else original)]


def write_portraits(folder: Path, groups: dict[str, list[int]]) -> Path:
    """Plain cohort folder: ``folder/<group>/<red>.png``, one solid-colour image per red value."""
    for group, reds in groups.items():
        (folder / group).mkdir(parents=True, exist_ok=True)
        for red in reds:
            Image.new("RGB", (32, 32), (red, 90, 160)).save(folder / group / f"p{red:03d}.png")
    return folder


@pytest.fixture
def portraits(tmp_path: Path) -> Path:
    return write_portraits(tmp_path / "cohort", {"female": [10, 20, 30], "male": [40, 50, 60]})


@pytest.fixture
def scripted_joint() -> type[ScriptedJoint]:
    return ScriptedJoint


@pytest.fixture
def make_portraits():
    return write_portraits


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
