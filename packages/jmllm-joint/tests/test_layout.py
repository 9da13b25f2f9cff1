"""The house by concept: ``jmllm.joint`` is sub-packages in layers, read from the tree with ``ast``.

- Nothing but ``__init__``/``__main__`` at the top level; every sub-package's ``__init__`` opens
  with a docstring whose first line says its job.
- Imports go only downward: a module imports its own sub-package or one in a lower layer of
  :data:`LAYERS` (lazy imports in functions count; a function importing upwards is a circle all
  the same). Sub-packages of one layer know nothing of each other.
- Modules stay short enough to read: at most :data:`MAX_LINES` lines.
- The pre-0.2 import paths (:data:`jmllm.joint.compat.MOVED_MODULES`) still import the moved module
  itself, with a :class:`DeprecationWarning` that names the new path.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import jmllm.joint
from jmllm.joint.compat import MOVED_MODULES, moved_to

# the source tree beside these tests (CI runs them against the installed wheel, so the package's
# own location is site-packages; the layout is the tree's)
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "jmllm" / "joint"
needs_tree = pytest.mark.skipif(not PACKAGE.is_dir(), reason="needs the source tree")

# bottom to top; the same layer's sub-packages are independent of each other
LAYERS = (
    ("compat",),
    ("chat", "detection"),
    ("model",),
    ("saliency", "testing"),
    ("render",),
    ("hallucination", "wsol"),
    ("audit",),
    ("toy",),
    ("faithfulness",),
    ("app",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 600


def _subpackages() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parents[1]).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _joint_imports(path: Path) -> list[tuple[str, int]]:
    """(sub-package, line) for every import of ``jmllm.joint.<sub-package>`` in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "jmllm.joint":
                names = [f"jmllm.joint.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["jmllm", "joint"] and len(parts) > 2:
                found.append((parts[2], node.lineno))
    return found


def _layer_problems(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in modules.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[2] == "__main__":  # the public facade and `python -m`
            continue
        own = parts[2]
        for other, line in _joint_imports(path):
            if other == own:
                continue
            if other not in RANK or own not in RANK:
                problems.append(f"{name}:{line} imports jmllm.joint.{other}: not in LAYERS")
            elif RANK[other] >= RANK[own]:
                problems.append(f"{name}:{line} imports jmllm.joint.{other}, not a lower layer")
    return problems


@needs_tree
def test_the_top_level_holds_only_sub_packages() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]


@needs_tree
def test_every_sub_package_is_in_a_layer_and_says_its_job() -> None:
    assert set(_subpackages()) == set(RANK)
    for name in _subpackages():
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"jmllm.joint.{name} has no first line"


@needs_tree
def test_imports_go_only_downward() -> None:
    assert _layer_problems(_modules()) == []


def test_the_layer_check_catches_an_upward_and_a_sideways_import(tmp_path: Path) -> None:
    """The check itself: model importing render (up) and wsol importing hallucination (same
    layer) are both reported; render importing model is not."""
    files = {
        "jmllm.joint.model.bad": "from jmllm.joint.render.drawing import font\n",
        "jmllm.joint.wsol.bad": "def f():\n    import jmllm.joint.hallucination.check\n",
        "jmllm.joint.render.good": "from jmllm.joint.model.joint import JointModel\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        modules[name] = path
    assert _layer_problems(modules) == [
        "jmllm.joint.model.bad:1 imports jmllm.joint.render, not a lower layer",
        "jmllm.joint.wsol.bad:2 imports jmllm.joint.hallucination, not a lower layer",
    ]


@needs_tree
def test_modules_are_short_enough_to_read() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_import_path_warns_and_gives_the_moved_module(old: str) -> None:
    new = MOVED_MODULES[old]
    for name in (old, *(n for n in list(sys.modules) if n == old or n.startswith(old + "."))):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new};.* 0\.3"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    installed = Path(jmllm.joint.__file__).parents[1]  # the old file is gone where it runs from
    assert not (installed / Path(*old.split("."))).with_suffix(".py").exists()


def test_a_name_below_an_old_path_moves_with_it() -> None:
    """``from jmllm.joint.families.base import X`` is the class of the new module, not a copy."""
    from jmllm.joint.model.families.base import FamilyAdapter

    sys.modules.pop("jmllm.joint.families.base", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from jmllm.joint.families.base import FamilyAdapter as old

    assert old is FamilyAdapter
    assert any("jmllm.joint.model.families.base" in str(w.message) for w in caught)
    assert moved_to("jmllm.joint.toy.cli") == "jmllm.joint.cli.toy"
    assert moved_to("jmllm.joint.toy.scenes") is None  # toy itself did not move


def test_paths_that_became_packages_still_export_their_names_without_a_warning() -> None:
    """The old modules that are packages now (model, chat, audit, wsol, ...) re-export what they
    exported, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from jmllm.joint.audit import run_audit  # noqa: F401
        from jmllm.joint.chat import get_template  # noqa: F401
        from jmllm.joint.hallucination import check_hallucinations  # noqa: F401
        from jmllm.joint.model import JointModel  # noqa: F401
        from jmllm.joint.wsol import run_wsol  # noqa: F401


@needs_tree
def test_the_changelog_lists_every_moved_path() -> None:
    changelog = (PACKAGE.parents[4] / "CHANGELOG.md").read_text(encoding="utf-8")
    missing = [
        f"{o} -> {n}" for o, n in MOVED_MODULES.items() if f"| `{o}` | `{n}` |" not in changelog
    ]
    assert missing == []


def test_the_warning_points_at_the_importing_line() -> None:
    sys.modules.pop("jmllm.joint.pope", None)
    with pytest.warns(DeprecationWarning) as caught:
        import jmllm.joint.pope  # noqa: F401

    assert caught[0].filename == __file__


@needs_tree
def test_the_architecture_page_draws_the_layers_and_has_a_row_per_sub_package() -> None:
    """docs/architecture.md: the Mermaid diagrams (the layers, t's data flow) and one table row
    per sub-package (the docs test of jmllm-align checks that every module is named)."""
    page = (PACKAGE.parents[4] / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert page.count("```mermaid") >= 2
    rows = {line.split("|")[1].strip(" `") for line in page.splitlines() if line.startswith("| `")}
    assert {f"jmllm.joint.{name}" for name in RANK if name != "compat"} <= rows
    for name in RANK:
        if name != "compat":
            assert f'{name}["{name} — ' in page, f"{name} is not drawn in the layers diagram"
