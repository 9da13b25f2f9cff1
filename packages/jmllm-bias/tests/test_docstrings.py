"""The ``>>>`` examples in the docstrings are part of the documentation: keep them true."""

import doctest
import importlib

import pytest

MODULES = [
    "__init__", "cohorts", "scores", "stats", "perturb", "errors", "generate", "assess", "files",
    "report",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name) -> None:
    module = importlib.import_module("jmllm.bias" if name == "__init__" else f"jmllm.bias.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
