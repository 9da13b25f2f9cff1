"""``docs/architecture.md`` matches the tree: every module of every package's ``src`` is named on
the page, and every ``jmllm.*`` name on the page is a module of the tree or a name defined at the
top level of one (a class, a function, a constant). Read statically; nothing is imported.

Skips where the tests run without the source tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES_DIR = ROOT / "packages"
pytestmark = pytest.mark.skipif(not PAGE.is_file(), reason="needs the source tree's docs/")

NAME = re.compile(r"`(jmllm(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def _modules() -> dict[str, Path]:
    found = {}
    for src in sorted(PACKAGES_DIR.glob("*/src")):
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _defines(path: Path, name: str) -> bool:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        elif isinstance(node, ast.ImportFrom):  # re-exports
            if any((a.asname or a.name) == name for a in node.names):
                return True
    return False


def _problems(page: str, modules: dict[str, Path]) -> list[str]:
    named = set(NAME.findall(page))
    problems = [f"{m} is not named on the page" for m in sorted(set(modules) - named - {"jmllm"})]
    for name in sorted(named):
        if name in modules:
            continue
        # module.Name or module.Class.attribute: the longest module prefix must define the rest
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                if not _defines(modules[module], parts[cut]):
                    problems.append(f"{name}: {module} defines no {parts[cut]}")
                break
        else:
            problems.append(f"{name}: no such module")
    return problems


def test_the_page_names_every_module_and_only_what_exists() -> None:
    assert _problems(PAGE.read_text(encoding="utf-8"), _modules()) == []


def test_the_check_catches_a_missing_module_and_a_stale_name(tmp_path) -> None:
    src = tmp_path / "jmllm" / "demo"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("class Thing:\n    pass\n")
    (src / "b.py").write_text("")
    modules = {"jmllm.demo": src / "__init__.py", "jmllm.demo.a": src / "a.py"}
    modules["jmllm.demo.b"] = src / "b.py"
    page = "`jmllm.demo` holds `jmllm.demo.a` (`jmllm.demo.a.Thing`, `jmllm.demo.a.Gone`), `jmllm.old`."
    assert _problems(page, modules) == [
        "jmllm.demo.b is not named on the page",
        "jmllm.demo.a.Gone: jmllm.demo.a defines no Gone",
        "jmllm.old: no such module",
    ]
