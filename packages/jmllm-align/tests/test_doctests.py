"""The ``>>>`` examples in the docstrings run (those marked +SKIP need real models or files)."""

from __future__ import annotations

import doctest
import importlib

import pytest

TRAIN = ["config", "sources", "distributed", "order", "checkpoint", "evaluation", "loop"]
MODULES = ["", ".architectures", ".weights", ".features", ".train", ".testing", ".cli", ".files"]
MODULES += [".preprocessing", ".images"]
MODULES += [f".train.{name}" for name in TRAIN]  # the trainer's parts hold its examples


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module("jmllm.align" + name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
