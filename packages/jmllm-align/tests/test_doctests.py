"""The ``>>>`` examples in the docstrings run (those marked +SKIP need real models or files)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["", ".architectures", ".weights", ".features", ".train", ".testing", ".cli", ".files"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module("jmllm.align" + name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
