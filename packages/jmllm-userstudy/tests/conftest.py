"""Shared fixtures: the example study, and a headless Chromium from Debian's package."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jmllm.userstudy.example import write_example
from jmllm.userstudy.spec import StudySpec, load_spec

CHROMIUM = Path("/usr/bin/chromium")
# Never let Playwright fetch a browser: it drives the system Chromium with these flags.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def _pristine_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    write_example(root)
    return root


@pytest.fixture
def example_dir(_pristine_example: Path, tmp_path: Path) -> Path:
    """A private copy of the example ``study.yaml`` and its placeholder images (safe to edit)."""
    return Path(shutil.copytree(_pristine_example, tmp_path / "study"))


@pytest.fixture
def example_spec(example_dir: Path) -> StudySpec:
    return load_spec(example_dir / "study.yaml")


def edit_spec(spec_dir: Path, old: str, new: str) -> Path:
    """Replace ``old`` by ``new`` in the example spec text (must occur) and return its path."""
    path = spec_dir / "study.yaml"
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


@pytest.fixture
def spec_editor() -> Any:
    return edit_spec


@pytest.fixture(scope="session")
def shared_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's one tiny J is built (by jmllm.joint.testing, the joint extra), shared
    with the other packages' tests: built once."""
    return tmp_path_factory.getbasetemp() / "jmllm-cache" / "tiny"


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """A headless Debian Chromium driven by Playwright (skipped only if Chromium is absent)."""
    if not CHROMIUM.is_file():
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh page that records script errors and every request that is not file:/data:/blob:."""
    context = chromium.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.errors = []
    page.external_requests = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on(
        "request",
        lambda req: (
            None
            if req.url.split(":", 1)[0] in ("file", "data", "blob")
            else page.external_requests.append(req.url)
        ),
    )
    yield page
    context.close()


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
