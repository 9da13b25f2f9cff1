"""Test, lint, type-check, build and benchmark every package under packages/.

Sessions discover the packages from the folder, so a new package needs no edit here.
`nox -l` lists the sessions; `nox` runs the default ones (the README's test command).

Wheels: every package's wheel is built once per change of its sources, into
``.nox/wheelhouse/<digest>/``, and every session that installs the packages (tests, slow, the
isolated installs, demo, bench) installs those same wheels: no session rebuilds them.

Tests: ``tests`` runs everything not marked ``slow`` (the budget: 10 minutes on a quiet 2-core
machine); ``slow`` runs the few long end-to-end tests (the documented command sequences, real-size
photos through the CLI, multi-process runs). Both are default sessions, so CI runs both, and both
print their 20 slowest tests.

CPU torch: every session that needs torch installs ``torch==2.13.0`` *before* the packages.
The packages themselves declare an ordinary ``torch>=…`` range; a bare range resolved on a
machine with no torch pulls a multi-GB CUDA build (see DEVELOPERS.md).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).parent
PACKAGES_DIR = ROOT / "packages"
TORCH_PIN = "torch==2.13.0"

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "slow", "isolated", "lint", "typecheck"]
WHEELHOUSE = ROOT / ".nox" / "wheelhouse"
BUILD_TOOLS = ["build", "hatchling>=1.25"]  # the packages' build-system: built without isolation
DURATIONS = "--durations=20"  # CI's output shows the 20 slowest tests, so growth is visible
nox.options.error_on_missing_interpreters = True

# No model or data set may come from the Hub in tests, demos or benchmarks (DESIGN.md §4).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


def _pyproject(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def _packages() -> dict[str, dict]:
    """Map distribution name (``jmllm-align``) to its parsed pyproject, for every package folder."""
    found = {}
    for folder in sorted(PACKAGES_DIR.iterdir()) if PACKAGES_DIR.is_dir() else []:
        if (folder / "pyproject.toml").is_file():
            found[folder.name] = _pyproject(folder / "pyproject.toml")
    return found


PACKAGES = _packages()
ROOT_CONFIG = _pyproject(ROOT / "pyproject.toml")


def _req_name(requirement: str) -> str:
    name = requirement
    for sep in "[<>=!~; ":
        name = name.split(sep, 1)[0]
    return name.strip().lower()


def _local_closure(dist: str, extras: tuple[str, ...] = ()) -> list[str]:
    """The sibling packages ``dist`` needs (its local dependencies, transitively), itself first."""
    order: list[str] = []
    todo = [(dist, extras)]
    while todo:
        name, want = todo.pop()
        if name in order:
            continue
        order.append(name)
        project = PACKAGES[name]["project"]
        reqs = list(project.get("dependencies", []))
        for extra in want:
            reqs += project.get("optional-dependencies", {}).get(extra, [])
        todo += [(_req_name(r), ()) for r in reqs if _req_name(r) in PACKAGES]
    return order


def _needs_torch(dist: str, extras: tuple[str, ...] = ()) -> bool:
    for name in _local_closure(dist, extras):
        project = PACKAGES[name]["project"]
        reqs = list(project.get("dependencies", []))
        if name == dist:
            for extra in extras:
                reqs += project.get("optional-dependencies", {}).get(extra, [])
        if any(_req_name(r) == "torch" for r in reqs):
            return True
    return False


def _group(name: str) -> list[str]:
    return list(ROOT_CONFIG["dependency-groups"][name])


def _all_extras(dist: str) -> str:
    extras = sorted(PACKAGES[dist]["project"].get("optional-dependencies", {}))
    return f"[{','.join(extras)}]" if extras else ""


def _dependency_order() -> list[str]:
    """Every package after the siblings it depends on (extras included).

    pip's resolver, given local folders with extras in one command, fails to match a sibling
    that a package listed *earlier* depends on ("No matching distribution found for
    jmllm-joint"), so the order of the arguments matters.
    """
    order: list[str] = []

    def visit(dist: str) -> None:
        if dist in order:
            return
        extras = tuple(PACKAGES[dist]["project"].get("optional-dependencies", {}))
        for dep in reversed(_local_closure(dist, extras)[1:]):
            visit(dep)
        order.append(dist)

    for dist in PACKAGES:
        visit(dist)
    return order


def _in_dependency_order(dist: str) -> list[str]:
    """``dist`` and the siblings it needs, dependencies first (see :func:`_dependency_order`)."""
    needed = set(_local_closure(dist))
    return [name for name in _dependency_order() if name in needed]


def _sources_digest(dist: str) -> str:
    """A digest of what goes into ``dist``'s wheel: its pyproject, README and sources."""
    folder = PACKAGES_DIR / dist
    files = [folder / "pyproject.toml", folder / "README.md"]
    files += sorted(
        p
        for p in (folder / "src").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _wheel_builder(session: nox.Session) -> str:
    """The Python of ``.nox/wheel-builder``, a venv holding only the build tools: wheels are built
    there, never in a session's own venv (an isolated install must hold only what the package
    declares)."""
    folder = ROOT / ".nox" / "wheel-builder"
    python = folder / "bin" / "python"
    if not python.is_file():
        session.run(sys.executable, "-m", "venv", str(folder), external=True, silent=True)
        session.run(
            str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            *BUILD_TOOLS, external=True, silent=True,
        )  # fmt: skip
    return str(python)


def wheel_paths(session: nox.Session, dists: list[str] | None = None) -> dict[str, Path]:
    """The wheel of each package (all by default), built once per change of its sources into
    ``.nox/wheelhouse/<digest>/`` and reused by every later session."""
    wanted = dists or list(PACKAGES)
    found: dict[str, Path] = {}
    missing = []
    for dist in wanted:
        folder = WHEELHOUSE / f"{dist}-{_sources_digest(dist)}"
        wheels = sorted(folder.glob(f"{dist.replace('-', '_')}-*.whl"))
        if wheels:
            found[dist] = wheels[-1]
        else:
            missing.append((dist, folder))
    if missing:
        python = _wheel_builder(session)
        for dist, folder in missing:
            partial = folder.with_name(folder.name + ".partial")
            partial.mkdir(parents=True, exist_ok=True)
            for old in partial.glob("*.whl"):
                old.unlink()
            session.run(
                python, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(partial),
                str(PACKAGES_DIR / dist), silent=True, external=True,
            )  # fmt: skip
            partial.rename(folder)  # whole or not at all: a killed build is rebuilt next time
            found[dist] = next(folder.glob("*.whl"))
    return found


def _install_wheels(session: nox.Session, dists: list[str], extras: bool = False) -> None:
    """Install the wheels of ``dists`` (in that order; siblings found beside them)."""
    wheels = wheel_paths(session, dists)
    links = [arg for folder in {w.parent for w in wheels.values()} for arg in ("-f", str(folder))]
    specs = [f"{wheels[d]}{_all_extras(d) if extras else ''}" for d in dists]
    session.install(*links, *specs)


def _install_all(session: nox.Session, *, editable: bool = False) -> None:
    """Install torch (CPU pin) first, then every package with all its extras (editable, from
    the tree; otherwise from the shared wheelhouse)."""
    session.install(TORCH_PIN)
    if editable:
        specs = [f"{PACKAGES_DIR / dist}{_all_extras(dist)}" for dist in _dependency_order()]
        session.install(*[arg for spec in specs for arg in ("-e", spec)])
        return
    _install_wheels(session, _dependency_order(), extras=True)


def _pytest(session: nox.Session, marks: str, *options: str) -> None:
    _install_all(session)
    session.install(*_group("test"))
    test_dirs = [str(PACKAGES_DIR / dist / "tests") for dist in PACKAGES]
    session.run(
        "pytest", *test_dirs, "-m", marks, *options, DURATIONS, *session.posargs, env=OFFLINE_ENV
    )


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests except the slow ones, in one environment, against the installed
    (non-editable) wheels."""
    _pytest(session, "not slow")


@nox.session
def slow(session: nox.Session) -> None:
    """The tests marked ``slow`` (long end-to-end runs), as ``tests`` runs the others, two at a
    time (pytest-xdist; each is a chain of processes that mostly keeps one core busy; tests of
    one ``xdist_group`` never run at the same time)."""
    _pytest(session, "slow", "-n", "2", "--dist", "loadgroup")


WHEEL_LIMIT_BYTES = 20_000_000  # jmllm-joint's wheel, toy-world weights included

TOY_WHEEL_CHECK = """
import sysconfig
from pathlib import Path
from jmllm.joint.toy import load_toy_joint, toy_manifest, toy_paths
from jmllm.joint.toy.train import file_digests
root = toy_paths().root
assert Path(sysconfig.get_paths()["purelib"]) in root.parents, f"{root}: not the installed wheel"
assert toy_manifest()["files"] == file_digests(root), "toy weights differ from their manifest"
model = load_toy_joint()
print("toy world in the wheel:", len(toy_manifest()["files"]), "files intact; J loads from", root)
"""


@nox.session
@nox.parametrize("package", list(PACKAGES))
def isolated(session: nox.Session, package: str) -> None:
    """Install one package's wheel alone (only its declared deps); import it, run its CLI --help
    and --version.

    Sibling packages it depends on come from their wheels (the shared wheelhouse, built from the
    tree's current sources), never from the tree itself.
    """
    if _needs_torch(package):
        session.install(TORCH_PIN)
    wheels = wheel_paths(session, _local_closure(package))
    links = [arg for folder in {w.parent for w in wheels.values()} for arg in ("-f", str(folder))]
    wheel = wheels[package]
    session.install(*links, str(wheel))
    module = "jmllm." + package.removeprefix("jmllm-")
    session.run(
        "python", "-c", f"import {module}; print({module}.__name__, 'imports')", env=OFFLINE_ENV
    )
    session.run(package, "--help", env=OFFLINE_ENV, silent=True)
    session.run(package, "--version", env=OFFLINE_ENV)
    session.run("python", "-m", "pip", "check")
    if package == "jmllm-joint":
        # the trained toy world ships inside the wheel: every file the manifest lists, intact,
        # and J loads from the installed copy
        if wheel.stat().st_size > WHEEL_LIMIT_BYTES:
            session.error(f"{wheel.name}: {wheel.stat().st_size} bytes > {WHEEL_LIMIT_BYTES}")
        session.run("python", "-c", TOY_WHEEL_CHECK, env=OFFLINE_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check over the whole tree."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Mypy over every package's sources (packages installed editable for their dependencies)."""
    _install_all(session, editable=True)
    session.install(*_group("typecheck"))
    sources = [str(PACKAGES_DIR / dist / "src") for dist in PACKAGES]
    session.run("mypy", *sources)


@nox.session
def build(session: nox.Session) -> None:
    """Build the wheel and sdist of every package into dist/."""
    session.install("build")
    out = ROOT / "dist"
    for dist in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(out), str(PACKAGES_DIR / dist))


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """The main job on the built-in models: J on a held-out toy scene with the toy-world models
    shipped in jmllm-joint, offline (``nox -s demo -- --out DIR``; default ``out/demo``)."""
    session.install(TORCH_PIN)
    _install_wheels(session, _in_dependency_order("jmllm-joint"))
    args = session.posargs or ["--out", str(ROOT / "out" / "demo")]
    session.run("jmllm-joint", "demo", *args, env=OFFLINE_ENV)


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ (``mkdocs build --strict``)."""
    session.install(*_group("docs"))
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(default=False, venv_params=["--system-site-packages"])
def gpu(session: nox.Session) -> None:
    """The one-command GPU check: J vs stock decode, GA seconds per token, W training MFU and
    one faithfulness run at full size with random weights, one JSON in ``.bench/gpu.json``
    (``./dev -s gpu``; about
    8 minutes on one H100/H200). Without CUDA: the same code paths, small, on the CPU.

    The session sees the system's packages, so a CUDA build of PyTorch installed there is used;
    the CPU pin is installed only when no torch is importable."""
    found = session.run(
        "python",
        "-c",
        "import importlib.util; print(importlib.util.find_spec('torch') is not None)",
        silent=True,
    )
    if "True" not in str(found):
        session.install(TORCH_PIN)
    _install_wheels(session, _in_dependency_order("jmllm-joint"))
    session.run(
        "python",
        str(ROOT / "benchmarks" / "_gpu_check.py"),
        "--json-out",
        str(ROOT / ".bench" / "gpu.json"),
        *session.posargs,
        env={**OFFLINE_ENV, "PYTHONUNBUFFERED": "1"},
    )


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run the benchmarks (all, or those named: ``nox -s bench -- ga_saliency``); JSON to stdout
    and to ``.bench/NAME.json``."""
    _install_all(session)
    available = sorted(
        p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")
    )
    chosen = session.posargs or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        session.error(
            f"Usage: nox -s bench -- [{'|'.join(available)}] (unknown: {', '.join(unknown)})"
        )
    out = ROOT / ".bench"
    out.mkdir(exist_ok=True)
    for name in chosen:
        session.run(
            "python",
            str(ROOT / "benchmarks" / f"{name}.py"),
            "--json-out",
            str(out / f"{name}.json"),
            env={**OFFLINE_ENV, "PYTHONUNBUFFERED": "1"},
        )
