"""Take the docs' report screenshots on the built-in toy world (``python docs/screenshots.py``).

Runs ``jmllm-joint demo`` and ``jmllm-joint hallucinations --tiny`` into a temporary folder and
photographs their pages in Debian's headless Chromium (``/usr/bin/chromium``) into
``docs/images/``: ``report-demo.png``, ``report-explanation.png`` (the word "triangle" picked)
and ``report-hallucination.png`` (an answer teacher-forced to name an absent circle). Offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

IMAGES = Path(__file__).resolve().parent / "images"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLI = [sys.executable, "-m", "jmllm.joint"]


def main() -> None:
    from jmllm.joint.toy.scenes import make_scene

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([*CLI, "demo", "--out", str(root / "demo")], env=ENV, check=True)
        scene = make_scene("heldout", 103)  # the demo's scene
        scene.image.save(root / "scene.png")
        answer = "a blue triangle, a red cross and a green circle"
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
            page.select_option("#pick", label="triangle")
            page.wait_for_timeout(300)
            page.screenshot(path=str(IMAGES / "report-explanation.png"), full_page=True)
            page.goto((root / "hal" / "hallucinations.html").as_uri())
            page.screenshot(path=str(IMAGES / "report-hallucination.png"), full_page=True)
            browser.close()
    print(f"screenshots -> {IMAGES}")


if __name__ == "__main__":
    main()
