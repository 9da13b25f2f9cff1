"""The shape of every jmllm package, read statically from the tree (``ast``, nothing imported).

- **Dependencies**: every third-party module a package's ``src`` imports (at module level, in a
  function, or through ``importlib.import_module``) is declared in its ``pyproject.toml``; every
  declared dependency is imported somewhere; a module-level import is a core dependency (an
  extra's package is imported lazily, where it is needed); one dependency has one version floor in
  every package that declares it.
- **No import cycles**: the graph of ``jmllm.*`` modules (lazy imports included, since a function
  importing upwards is a circle all the same) has no cycle.

These tests read ``packages/*`` of the source tree; they skip where the tests run without it.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[3]
PACKAGES_DIR = ROOT / "packages"
PACKAGES = (
    sorted(p.name for p in PACKAGES_DIR.iterdir() if (p / "pyproject.toml").is_file())
    if PACKAGES_DIR.is_dir()
    else []
)
pytestmark = pytest.mark.skipif(not PACKAGES, reason="needs the source tree's packages/ folder")

# Import names that differ from the distribution's name.
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cv2": "opencv-python-headless",
    "huggingface_hub": "huggingface-hub",
}


def _project(package: str) -> dict:
    with (PACKAGES_DIR / package / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].strip().lower()


def _modules() -> dict[str, tuple[Path, str]]:
    """Every ``jmllm.*`` module of the tree: dotted name -> (file, package folder)."""
    found = {}
    for package in PACKAGES:
        src = PACKAGES_DIR / package / "src"
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = (path, package)
    return found


def _imports(name: str, path: Path, known: dict) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import of one file: absolute names, with
    relative imports resolved, ``from a import b`` as ``a.b`` when that is a module of the tree,
    and ``importlib.import_module`` of a literal or of a module-level tuple of module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    listed = [  # module-level tuples/lists of module names (plugin lists)
        element.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List))
        for element in node.value.elts
        if isinstance(element, ast.Constant) and element.value in known
    ]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
        ):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if not arg.value.startswith("."):
                    names = [arg.value]
            else:
                names = listed
        found += [(n, id(node) in top) for n in names]
    return found


MODULES = _modules() if PACKAGES else {}


def _dependency_problems(package: str) -> list[str]:
    project = _project(package)
    core = {_name(r) for r in project.get("dependencies", [])}
    extras = {_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    used: dict[str, bool] = {}  # distribution -> imported at module level somewhere
    for name, (path, owner) in MODULES.items():
        if owner != package:
            continue
        for module, eager in _imports(name, path, MODULES):
            root = module.split(".")[0]
            if root in sys.stdlib_module_names or root == "__future__":
                continue
            if root == "jmllm":
                dist = "jmllm-" + module.split(".")[1] if "." in module else package
            else:
                dist = DISTRIBUTION_OF.get(root, root.replace("_", "-")).lower()
            if dist == package:
                continue
            used[dist] = used.get(dist, False) or eager
    problems = [f"imports {d} but does not declare it" for d in sorted(set(used) - core - extras)]
    problems += [f"declares {d} but never imports it" for d in sorted((core | extras) - set(used))]
    problems += [
        f"imports {d} at module level, but it is only an extra"
        for d, eager in sorted(used.items())
        if eager and d in extras and d not in core
    ]
    return problems


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_match_declared_dependencies(package: str) -> None:
    assert _dependency_problems(package) == []


def test_the_dependency_check_catches_a_missing_and_an_unused_declaration(tmp_path, monkeypatch):
    """The check itself: an undeclared import, an unused declaration and an eager extra."""
    src = tmp_path / "jmllm-demo" / "src" / "jmllm" / "demo"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("import numpy\nimport yaml\n\ndef f():\n    import PIL\n")
    (src.parents[2] / "pyproject.toml").write_text(
        '[project]\nname = "jmllm-demo"\ndependencies = ["numpy>=1.26", "scipy>=1.15"]\n'
        '[project.optional-dependencies]\nyaml = ["pyyaml>=6"]\nimg = ["pillow>=10"]\n'
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES_DIR", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ["jmllm-demo"])
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _modules())
    assert _dependency_problems("jmllm-demo") == [
        "declares scipy but never imports it",
        "imports pyyaml at module level, but it is only an extra",
    ]
    (src / "__init__.py").write_text("import numpy, scipy, matplotlib\n")
    assert "imports matplotlib but does not declare it" in _dependency_problems("jmllm-demo")


def _floors() -> dict[str, set[str]]:
    specs: dict[str, set[str]] = {}
    for package in PACKAGES:
        project = _project(package)
        reqs = list(project.get("dependencies", []))
        reqs += [r for rs in project.get("optional-dependencies", {}).values() for r in rs]
        for r in reqs:
            spec = re.sub(r"\s+", "", r.split(";")[0])[len(_name(r)) :]
            specs.setdefault(_name(r), set()).add(re.sub(r"^\[[^\]]*\]", "", spec))
    return specs


@pytest.mark.parametrize("dependency", sorted(_floors() if PACKAGES else {}))
def test_one_version_range_per_dependency(dependency: str) -> None:
    assert len(_floors()[dependency]) == 1, _floors()[dependency]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _module_graph(modules: dict[str, tuple[Path, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (path, _) in modules.items():
        edges = set()
        for module, _eager in _imports(name, path, modules):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name:
                edges.add(module)
        graph[name] = edges
    return graph


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    cycles = _cycles(_module_graph(MODULES))
    assert [c for c in cycles if any(MODULES[m][1] == package for m in c)] == []


def test_the_cycle_check_finds_a_circle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


TRAINER_PARTS = ["config", "sources", "distributed", "order", "checkpoint", "evaluation", "loop"]


def test_the_trainer_parts_import_only_those_above_them():
    """jmllm.align.train reads top to bottom: each part imports only the parts listed before it
    (and the package's __init__ only re-exports)."""
    for position, part in enumerate(TRAINER_PARTS):
        name = f"jmllm.align.train.{part}"
        path, _ = MODULES[name]
        inside = {
            m.rsplit(".", 1)[1]
            for m, _eager in _imports(name, path, MODULES)
            if m.startswith("jmllm.align.train.")
        }
        assert inside <= set(TRAINER_PARTS[:position]), (part, inside)
    parts = {p.stem for p in MODULES["jmllm.align.train"][0].parent.glob("*.py")} - {"__init__"}
    assert parts == set(TRAINER_PARTS)


SALIENCY_PARTS = ["gradients", "maps", "answers", "results", "api"]


def test_the_saliency_parts_import_only_those_above_them():
    """jmllm.joint.saliency reads the same way: gradient math, maps, answers, results, then the
    API (and the package's __init__ only re-exports)."""
    for position, part in enumerate(SALIENCY_PARTS):
        name = f"jmllm.joint.saliency.{part}"
        path, _ = MODULES[name]
        inside = {
            m.rsplit(".", 1)[1]
            for m, _eager in _imports(name, path, MODULES)
            if m.startswith("jmllm.joint.saliency.")
        }
        assert inside <= set(SALIENCY_PARTS[:position]), (part, inside)
    parts = {p.stem for p in MODULES["jmllm.joint.saliency"][0].parent.glob("*.py")} - {"__init__"}
    assert parts == set(SALIENCY_PARTS)
