"""``jmllm-joint app`` in a real browser (Debian's headless Chromium), offline.

The app is started by its command line; the page is driven as a person would: bad uploads get
one sentence naming the user's file (never the server's path), an image is uploaded, a question
asked (the answer length is bounded by the model's positions, and the chat panel shows the
latest answer from its top), a word of the answer clicked (its map appears; the next word reuses
the cached norms), the queries changed (the boxes change), the hallucination view checked, the
report downloaded — and it must equal the report the explorer computes directly — and the chat
started over. A second tab works at the same time without disturbing the first. On the built-in
(toy-world) models a photo gets the toy world's warning on the page. The server's log has no
share-link banner. Every request the page makes must stay on 127.0.0.1; any other is refused, as
on a machine without a network.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jmllm.joint.app.explorer import Explorer
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


@dataclass
class Server:
    url: str
    log: Path


def _serve(
    tmp_path_factory: Any, env_extra: dict[str, str], options: list[str]
) -> Iterator[Server]:
    """``jmllm-joint app OPTIONS`` in a subprocess until the module's tests are done."""
    pytest.importorskip("gradio")
    port = _free_port()
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    env = {
        **os.environ,
        **env_extra,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "GRADIO_TEMP_DIR": str(log.parent / "gradio"),
    }
    argv = [sys.executable, "-m", "jmllm.joint.cli", "app", "--port", str(port), *options]
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
        yield Server(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tiny_joint_paths, tmp_path_factory) -> Iterator[Server]:
    """``jmllm-joint app`` on the session's tiny random-weight checkpoints given as explicit
    sources: the page is compared with an in-process explorer on the same tiny models (whose
    long, random answers also fill the chat panel)."""
    options = ["--owl", str(tiny_joint_paths.owl), "--mllm", str(tiny_joint_paths.llava)]
    options += ["--alignment", str(tiny_joint_paths.alignment), "--device", "cpu"]
    options += ["--max-upload-mb", "1", "--max-pixels", str(MAX_PIXELS)]
    env = {"JMLLM_CACHE": str(tiny_joint_paths.root.parent)}
    yield from _serve(tmp_path_factory, env, options)


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


def _toast_text(page: Any, text: str) -> str:
    toast = page.locator(".toast-body", has_text=text).first
    toast.wait_for()
    return " ".join(toast.inner_text().split())


def test_the_whole_flow_offline(server, browser, tiny_joint, tmp_path):
    remote: list[str] = []
    image_a = tmp_path / "scene.png"
    generated_images(1, size=160, seed=21)[0].save(image_a)
    page = _page(browser, server.url, remote)
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
    shown = _toast_text(page, "junk.png: not a readable image")
    # one sentence naming the file as the user gave it: no server path, no Python repr
    assert "junk.png: not a readable image (unknown or unsupported image format)" in shown
    assert "/" not in shown and "<" not in shown and "gradio" not in shown, shown
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

    # the answer length is bounded by the model's positions
    page.get_by_text("Chat options").click()
    page.locator("#jm-max-tokens input[type=range]").wait_for()
    bound = page.locator("#jm-max-tokens input[type=range]").get_attribute("max")
    assert int(float(bound)) == explorer.max_new_tokens < 256  # the tiny LLaVA's positions

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
    other = _page(browser, server.url, remote)
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

    # a new chat: the same image, no answers, no words; the next answer is a first answer
    page.click("#jm-reset")
    page.wait_for_function(
        "() => document.querySelectorAll('#jm-chat [data-testid=bot]').length === 0"
    )
    _settle(page)
    assert page.locator("#jm-words label").count() == 0
    again = _ask(page, "Describe it.")
    first = explorer.ask(explorer.open_image(image_a), "Describe it.")
    assert again == _words(first.last_answer.text)
    page.context.close()
    assert remote == [], f"requests left 127.0.0.1: {remote}"
    # the server's log: where the page is, and no share-link banner (there is no share link)
    log = server.log.read_text()
    assert "jmllm explorer: http://127.0.0.1:" in log
    assert "share" not in log.lower() and "public link" not in log.lower(), log


def _latest_answer_in_view(page: Any) -> dict[str, float]:
    """Where the latest answer is in the chat panel's scrolling box (pixels)."""
    return page.evaluate(
        """() => {
          const root = document.getElementById('jm-chat');
          const bots = root.querySelectorAll('[data-testid=bot]');
          const last = bots[bots.length - 1];
          let box = last.parentElement;
          while (box !== root && getComputedStyle(box).overflowY !== 'auto') box = box.parentElement;
          const a = last.getBoundingClientRect(), b = box.getBoundingClientRect();
          return {top: a.top - b.top, bottom: a.bottom - b.top, height: b.height,
                  scrolled: box.scrollTop, overflow: box.scrollHeight - box.clientHeight,
                  words: last.innerText.split(/\\s+/).length};
        }"""
    )


def _set_max_tokens(page: Any, n: int) -> None:
    """Type ``n`` in the max-tokens box and wait until the slider holds it: the next question
    is sent with the slider's value, and an ask clicked before the box's edit was committed
    went out with the old limit (a CI run got a 64-token answer where 150 was typed)."""
    box = page.locator("#jm-max-tokens input[type=number]")
    box.fill(str(n))
    box.press("Enter")
    box.blur()
    page.wait_for_function(
        "n => Number(document.querySelector('#jm-max-tokens input[type=range]').value) === n",
        arg=n,
    )


def test_the_chat_panel_shows_the_latest_answer_from_its_top(server, browser, tmp_path):
    """A short window (the panel 150 px high) and long answers: after each answer the panel
    shows the answer whole, or its top when it is taller than the panel (it used to scroll to
    the bottom, cutting the answer's beginning off)."""
    remote: list[str] = []
    image = tmp_path / "scene.png"
    generated_images(1, size=160, seed=3)[0].save(image)
    page = _page(browser, server.url, remote)
    page.add_style_tag(
        content="#jm-chat .bubble-wrap, #jm-chat > div { height: 150px !important; "
        "max-height: 150px !important; }"
    )
    _upload(page, image)
    page.locator("#jm-picture img").wait_for()
    page.get_by_text("Chat options").click()
    seen = []

    def check(question: str) -> None:
        _ask(page, question)
        # the page lays the answer out, then scrolls: read it once two reads agree (a fixed
        # pause read it mid-way on a loaded machine)
        where, deadline = _latest_answer_in_view(page), time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.6)
            now = _latest_answer_in_view(page)
            if now == where:
                break
            where = now
        seen.append(where)
        assert where["top"] >= -1, where  # the answer's beginning is never cut off
        if where["bottom"] - where["top"] <= where["height"]:
            assert where["bottom"] <= where["height"] + 1, where  # short: shown whole
        else:
            assert where["top"] <= 12, where  # tall: shown from its top

    # the longest random answer the model allows, well taller than the panel (150 tokens made
    # one only 30 px taller than it)
    bound = page.locator("#jm-max-tokens input[type=range]").get_attribute("max")
    _set_max_tokens(page, int(float(bound)))
    check("What's in the image?")
    page.click("#jm-reset")  # the conversation would outgrow the tiny LLaVA's 256 positions
    page.wait_for_function(
        "() => document.querySelectorAll('#jm-chat [data-testid=bot]').length === 0"
    )
    _set_max_tokens(page, 12)  # short answers: after a few, the panel scrolls to show the latest
    for question in ("Hello?", "And then?", "Tell me more.", "Why?"):
        check(question)
    assert any(w["overflow"] > 0 for w in seen)  # the panel did have to scroll
    assert any(w["bottom"] - w["top"] > w["height"] for w in seen), seen  # a tall answer
    page.context.close()
    assert remote == []


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory) -> Iterator[Server]:
    """``jmllm-joint app --tiny``: the built-in toy-world models."""
    yield from _serve(tmp_path_factory, {}, ["--tiny"])


@pytest.mark.slow
def test_the_toy_worlds_warning_about_a_photo_is_on_the_page(toy_server, browser, tmp_path):
    from jmllm.joint.cli.common import TOY_DEMO_SCENE
    from jmllm.joint.toy.scenes import make_scene

    remote: list[str] = []
    page = _page(browser, toy_server.url, remote)
    photo = tmp_path / "holiday.png"
    generated_images(1, size=200, seed=4)[0].save(photo)
    _upload(page, photo)
    page.locator("#jm-picture img").wait_for()
    notice = page.locator("#jm-image-notice")
    notice.wait_for()
    text = " ".join(notice.inner_text().split())
    from PIL import Image

    from jmllm.joint.toy.inputs import toy_input_check

    expected = toy_input_check(Image.open(photo).convert("RGB"), (200, 200))
    assert expected and text == " ".join(f"holiday.png: {expected}".split()), text
    scene = tmp_path / "scene.png"
    make_scene(*TOY_DEMO_SCENE).image.save(scene)
    _upload(page, scene)
    _settle(page)
    page.wait_for_function("() => !document.querySelector('#jm-image-notice')?.offsetParent")
    page.context.close()
    assert remote == []
