"""``jmllm-joint app`` in a real browser (Debian's headless Chromium), offline.

The app is started by its command line on the built-in models; the page is driven as a person
would: bad uploads get a message in the page, an image is uploaded, a question asked, a word of
the answer clicked (its map appears; the next word reuses the cached norms), the queries changed
(the boxes change), the hallucination view checked and the report downloaded — and it must equal
the report the explorer computes directly. A second tab works at the same time without
disturbing the first. Every request the page makes must stay on 127.0.0.1; any other is refused,
as on a machine without a network.

The screenshots of ``docs/app.md`` are taken on the toy world by ``docs/screenshots.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jmllm.joint.explorer import Explorer
from jmllm.joint.testing import generated_images

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")  # the system browser; a test never downloads one
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
]
QUESTION = "What's in the image?"
MAX_PIXELS = 1_000_000  # small, so that a light file can exceed it
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_joint_paths, tmp_path_factory) -> Iterator[str]:
    """``jmllm-joint app`` in a subprocess, on the session's tiny random-weight checkpoints
    given as explicit sources (``--tiny`` serves the toy world; this test compares the page with
    an in-process explorer on the same tiny models)."""
    pytest.importorskip("gradio")
    port = _free_port()
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    env = {
        **os.environ,
        "JMLLM_CACHE": str(tiny_joint_paths.root.parent),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "GRADIO_TEMP_DIR": str(log.parent / "gradio"),
    }
    argv = [sys.executable, "-m", "jmllm.joint.cli", "app", "--port", str(port)]
    argv += ["--owl", str(tiny_joint_paths.owl), "--mllm", str(tiny_joint_paths.llava)]
    argv += ["--alignment", str(tiny_joint_paths.alignment), "--device", "cpu"]
    argv += ["--max-upload-mb", "1", "--max-pixels", str(MAX_PIXELS)]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield browser
        browser.close()


def _page(browser: Any, url: str, remote: list[str]) -> Any:
    """A new tab on the app; any request that would leave 127.0.0.1 is recorded and refused."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    local = url.rstrip("/")

    def route(r: Any) -> None:
        if r.request.url.startswith((local, "data:", "blob:")):
            r.continue_()
        else:
            remote.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    page.wait_for_selector("#jm-upload input[type=file]", state="attached")
    return page


def _upload(page: Any, path: Path) -> None:
    file_input = page.locator("#jm-upload input[type=file]")
    if not file_input.count():  # a file is shown: clear it first, as a person would
        page.locator("#jm-upload button[aria-label=Clear]").first.click()
    file_input.set_input_files(str(path))


def _toast(page: Any, text: str) -> None:
    page.locator(".toast-body", has_text=text).first.wait_for()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for close in page.locator(".toast-body .toast-close").all():
        try:
            close.click(timeout=3000)
        except PlaywrightTimeout:  # an earlier toast closed on its own in the meantime
            pass


def _settle(page: Any) -> None:
    """Wait until no event is running (every component's progress tracker hidden: none is left
    in an error state either, which would cover the component)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".every(e => e.classList.contains('hide'))"
    )


def _wait_text(page: Any, selector: str, text: str) -> str:
    _settle(page)
    page.locator(selector, has_text=text).first.wait_for()
    return page.inner_text(selector)


def _words(text: str) -> str:
    return " ".join(text.split())


def _shot(page: Any, name: str, tmp_path: Path, selector: str | None = None) -> None:
    """A screenshot into the test's folder; the docs' explorer pictures are taken on the toy
    world by docs/screenshots.py, not on these random test models."""
    folder = tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    if selector:
        page.locator(selector).screenshot(path=str(folder / name))
    else:
        page.screenshot(path=str(folder / name), full_page=True)


def _ask(page: Any, question: str) -> str:
    before = page.locator("#jm-chat [data-testid=bot]").count()
    page.locator("#jm-question textarea").fill(question)
    page.click("#jm-ask")
    page.locator("#jm-chat [data-testid=bot]").nth(before).wait_for()
    page.locator("#jm-words label").first.wait_for()
    _settle(page)
    return _words(page.locator("#jm-chat [data-testid=bot]").nth(before).inner_text())


def _set_queries(page: Any, text: str) -> None:
    box = page.locator("#jm-queries textarea")
    box.fill(text)
    box.press("Enter")


def test_the_whole_flow_offline(server, browser, tiny_joint, tmp_path):
    remote: list[str] = []
    image_a = tmp_path / "scene.png"
    generated_images(1, size=160, seed=21)[0].save(image_a)
    page = _page(browser, server, remote)
    assert page.title() == "jmllm explorer"

    # a question before any image, then bad uploads: a message in the page, which keeps working
    page.locator("#jm-question textarea").fill(QUESTION)
    page.click("#jm-ask")
    _toast(page, "image: upload an image")
    _settle(page)  # no component left in an error state…
    page.locator("#jm-question textarea").click(timeout=5000)  # …that would block it
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    _upload(page, junk)
    _toast(page, "junk.png: not a readable image")
    huge = tmp_path / "wide.png"
    generated_images(1, size=1200, seed=1)[0].resize((1200, 1000)).save(huge)
    _upload(page, huge)
    _toast(page, "wide.png: image too large: 1200x1000 pixels")
    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(os.urandom(2 * 2**20))
    _upload(page, heavy)
    _toast(page, "exceed the maximum allowed size")

    # upload, detect typed objects, ask
    _upload(page, image_a)
    page.locator("#jm-picture img").wait_for()
    _set_queries(page, "house, tree")
    _wait_text(page, "#jm-detections", "house")
    answer = _ask(page, QUESTION)
    assert page.locator("#jm-chat [data-testid=user]").first.inner_text().strip() == QUESTION
    explorer = Explorer(tiny_joint)
    state = explorer.ask(explorer.open_image(image_a), QUESTION)
    assert answer == _words(state.last_answer.text)  # J's own answer, shown as written

    # click a word: its map appears; the next word reuses the norms
    words = page.locator("#jm-words label")
    assert words.count() == len(explorer.words(state))
    words.nth(1).click()
    page.locator("#jm-map img").wait_for()
    page.locator("#jm-boxes img").wait_for()
    _wait_text(page, "#jm-ga-status", "norms computed")
    _wait_text(page, "#jm-top", "class weight")
    words.nth(2).click()
    _wait_text(page, "#jm-ga-status", "norms cached")
    _shot(page, "app-explain.png", tmp_path)
    page.locator("#jm-weighting label", has_text="plain gradient").click()
    _wait_text(page, "#jm-ga-status", "already explained")
    page.locator("#jm-weighting label", has_text="class").first.click()
    _wait_text(page, "#jm-ga-status", "already explained")

    # other queries: other boxes
    picture = page.locator("#jm-picture img")
    before_src, before_png = picture.get_attribute("src"), picture.screenshot()
    _set_queries(page, "car")
    _wait_text(page, "#jm-detections", "car")
    page.wait_for_function(
        "src => document.querySelector('#jm-picture img').getAttribute('src') !== src",
        arg=before_src,
    )
    assert picture.screenshot() != before_png
    page.locator("#jm-words label").nth(0).click()
    _wait_text(page, "#jm-ga-status", "norms computed")  # new queries: new norms

    # hallucination view of the answer (car typed: detected but not mentioned, or not)
    page.click("#jm-hallucination-button")
    _wait_text(page, "#jm-hallucination-table", "car")
    _shot(page, "app-hallucination.png", tmp_path, "#jm-hallucination-view")

    # download the report: the page the explorer (and the CLI) writes for this state
    page.click("#jm-report")
    link = page.locator("#jm-files a[download='report.html']")
    link.wait_for()
    with page.expect_download() as info:
        link.click()
    downloaded = Path(info.value.path()).read_text(encoding="utf-8")
    state = explorer.set_queries(state, "car")
    assert downloaded == explorer.report_html(state)
    assert page.locator("#jm-files a[download='explanation.html']").count() == 1
    assert page.locator("#jm-files a[download='hallucinations.html']").count() == 1

    # a second tab at the same time: its own image and conversation, the first one untouched
    image_b = tmp_path / "tall.png"
    generated_images(1, size=96, seed=5)[0].resize((96, 160)).save(image_b)
    other = _page(browser, server, remote)
    _upload(other, image_b)
    other.locator("#jm-picture img").wait_for()
    answer_b = _ask(other, "Describe it.")
    state_b = explorer.ask(explorer.open_image(image_b), "Describe it.")
    assert answer_b == _words(state_b.last_answer.text)
    assert _words(page.locator("#jm-chat [data-testid=bot]").first.inner_text()) == answer
    page.locator("#jm-words label").nth(2).click()
    _wait_text(page, "#jm-ga-status", "norms cached")  # image A's norms, kept across tabs
    assert page.locator("#jm-chat [data-testid=bot]").count() == 1
    other.context.close()
    page.context.close()
    assert remote == [], f"requests left 127.0.0.1: {remote}"
