"""Take the docs' report screenshots on the built-in toy world (``python docs/screenshots.py``).

Runs ``jmllm-joint demo`` and ``jmllm-joint hallucinations --tiny`` into a temporary folder and
photographs their pages in Debian's headless Chromium (``/usr/bin/chromium``) into
``docs/images/``: ``report-demo.png``, ``report-explanation.png`` (the word "cross" picked)
and ``report-hallucination.png`` (an answer teacher-forced to name an absent circle); then
serves ``jmllm-joint app --tiny`` and photographs the explorer: ``app-explain.png`` (the word
"cross" clicked) and ``app-hallucination.png``; and renders ``jmllm-userstudy example`` (the
toy world's user study) and photographs its first question: ``userstudy-question.png``. Offline:
any request leaving the machine is refused.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

IMAGES = Path(__file__).resolve().parent / "images"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLI = [sys.executable, "-m", "jmllm.joint"]


def _settle(page: Any) -> None:
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".every(e => e.classList.contains('hide'))"
    )


def _app_shots(browser: Any, scene: Path, root: Path) -> None:
    """Serve the explorer on the toy world, ask about ``scene``, click "cross", photograph."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "GRADIO_TEMP_DIR": str(root / "gradio"), "MPLBACKEND": "Agg"}
    argv = [*CLI, "app", "--tiny", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(argv, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the explorer did not start") from None
                time.sleep(0.5)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.route(
            "**/*",
            lambda r: (
                r.continue_()
                if r.request.url.startswith((url.rstrip("/"), "data:", "blob:"))
                else r.abort()
            ),
        )
        page.goto(url)
        page.locator("#jm-upload input[type=file]").set_input_files(str(scene))
        page.locator("#jm-picture img").wait_for()
        queries = page.locator("#jm-queries textarea")
        queries.fill("triangle, cross, circle")
        queries.press("Enter")
        _settle(page)
        page.locator("#jm-question textarea").fill("What's the content of the image?")
        page.click("#jm-ask")
        page.locator("#jm-chat [data-testid=bot]").first.wait_for()
        page.locator("#jm-words label").first.wait_for()
        _settle(page)
        page.locator("#jm-words label", has_text="cross").first.click()
        page.locator("#jm-map img").wait_for()
        _settle(page)
        page.screenshot(path=str(IMAGES / "app-explain.png"), full_page=True)
        page.click("#jm-hallucination-button")
        page.locator("#jm-hallucination-table", has_text="circle").first.wait_for()
        _settle(page)
        page.locator("#jm-hallucination-view").screenshot(
            path=str(IMAGES / "app-hallucination.png")
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _userstudy_shot(browser: Any, root: Path) -> None:
    """The toy world's user-study example, rendered; its first question at 1280 px."""
    study = [sys.executable, "-m", "jmllm.userstudy.cli"]
    subprocess.run([*study, "example", "-o", str(root / "study")], env=ENV, check=True)
    spec = root / "study" / "study.yaml"
    subprocess.run([*study, "render", str(spec), "-o", str(root / "site")], env=ENV, check=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((root / "site" / "questionnaire.html").as_uri())
    page.wait_for_selector("html[data-ready=true]", state="attached")
    page.fill("#participant-id", "P-01")
    page.click("#start-button")
    page.wait_for_selector("#question", state="visible")
    for sel in ("#img-image", "#img-expl-1", "#img-expl-2"):
        page.wait_for_function(f"document.querySelector('{sel}').complete")
    page.screenshot(path=str(IMAGES / "userstudy-question.png"), full_page=True)
    page.close()


def main() -> None:
    from jmllm.joint.cli.common import TOY_DEMO_SCENE
    from jmllm.joint.toy.scenes import make_scene

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([*CLI, "demo", "--out", str(root / "demo")], env=ENV, check=True)
        scene = make_scene(*TOY_DEMO_SCENE)  # the demo's scene: a yellow triangle, a green cross
        scene.image.save(root / "scene.png")
        answer = "a yellow triangle, a green cross and a red circle"  # the circle is absent
        subprocess.run(
            [
                *CLI,
                "hallucinations",
                "--tiny",
                str(root / "scene.png"),
                "-p",
                "What's the content of the image?",
                "--answer",
                answer,
                "--out",
                str(root / "hal"),
            ],
            env=ENV,
            check=True,
        )
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route(
                "**/*",
                lambda r: (
                    r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort()
                ),
            )
            page.goto((root / "demo" / "report.html").as_uri())
            page.screenshot(path=str(IMAGES / "report-demo.png"), full_page=True)
            page.goto((root / "demo" / "explanation" / "report.html").as_uri())
            page.select_option("#pick", label="cross")
            page.wait_for_timeout(300)
            page.screenshot(path=str(IMAGES / "report-explanation.png"), full_page=True)
            page.goto((root / "hal" / "hallucinations.html").as_uri())
            page.screenshot(path=str(IMAGES / "report-hallucination.png"), full_page=True)
            _app_shots(browser, root / "scene.png", root)
            _userstudy_shot(browser, root)
            browser.close()
    print(f"screenshots -> {IMAGES}")


if __name__ == "__main__":
    main()
