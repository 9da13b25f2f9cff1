"""The toy world depends on its seed only: every trainer gives the same weights, bit for bit,
whatever state the global random generator is in when it is called (torch seeds that generator
at random on start-up, so two runs of ``toy train`` start from different global states).

A few steps of each stage on a few scenes; the state is scrambled between the two runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
import torch

pytest.importorskip("tokenizers")

from jmllm.joint.toy.captioner import CaptionerRecipe, train_captioner
from jmllm.joint.toy.detector import DetectorRecipe, train_detector
from jmllm.joint.toy.models import (
    ToyDims,
    new_llava,
    new_owl,
    toy_llava_tokenizer,
    toy_owl_tokenizer,
)
from jmllm.joint.toy.pool import ScenePool
from jmllm.joint.toy.qwen import QwenDims, new_qwen, toy_qwen_tokenizer

# built once: the tokenizers are trained on a corpus, deterministically (not what is tested here)
_toy_llava_tokenizer = cache(toy_llava_tokenizer)
_toy_qwen_tokenizer = cache(toy_qwen_tokenizer)
_toy_owl_tokenizer = cache(toy_owl_tokenizer)
CAPTIONER = CaptionerRecipe(steps=2, vision_steps=2, batch_size=2, warmup_steps=1)


@pytest.fixture(scope="module")
def pool() -> ScenePool:
    return ScenePool.render("train", 6, seed=0, progress=False)


def _llava(pool: ScenePool) -> torch.nn.Module:
    tokenizer = _toy_llava_tokenizer()
    model = new_llava(ToyDims(), tokenizer, 1)
    train_captioner(model, tokenizer, pool, CAPTIONER, seed=0, progress=False)
    return model


def _qwen(pool: ScenePool) -> torch.nn.Module:
    tokenizer = _toy_qwen_tokenizer()
    model = new_qwen(QwenDims(), tokenizer, 1)
    train_captioner(model, tokenizer, pool, CAPTIONER, seed=0, progress=False)
    return model


def _owl(pool: ScenePool) -> torch.nn.Module:
    tokenizer = _toy_owl_tokenizer()
    model = new_owl(ToyDims(), tokenizer, 0)
    recipe = DetectorRecipe(steps=2, batch_size=2, warmup_steps=1)
    train_detector(model, tokenizer, pool, recipe, seed=0, progress=False)
    return model


@pytest.mark.parametrize("train", [_llava, _qwen, _owl], ids=["llava", "qwen2_vl", "owlvit"])
def test_a_trainer_depends_on_its_seed_not_on_the_global_generator(
    pool: ScenePool, train: Callable[[ScenePool], Any]
) -> None:
    runs = []
    for scramble in (1, 2):
        torch.manual_seed(scramble)  # what a fresh process's random start-up seed does
        runs.append(train(pool).state_dict())
    first, second = runs
    assert first.keys() == second.keys()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, f"{len(differing)} tensors differ between runs, e.g. {differing[:3]}"
