"""Every docstring example of every ``jmllm.joint`` module runs and shows what it says.

One test over the whole package rather than a list per test file, so an example that moves with
its function (the package was regrouped) or is added to a new module is run all the same.
Examples that need real checkpoints, a network or minutes are marked ``# doctest: +SKIP`` where
they are written.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jmllm.joint

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(jmllm.joint.__path__, "jmllm.joint.")
    if not m.name.endswith("__main__")
)


def test_every_module_is_found() -> None:
    assert {"jmllm.joint.model.joint", "jmllm.joint.cli.toy", "jmllm.joint.compat"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
