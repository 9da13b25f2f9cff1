"""The GA and hallucination reports in a real browser (Debian's headless Chromium).

Choosing a word must show that word's panel and only it, the chosen word must stay readable
(whatever its hit/miss colour), and the page must load nothing from the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jmllm.joint.explain_report import write_explanation_report
from jmllm.joint.hallucination import check_hallucinations, write_hallucination_report
from jmllm.joint.saliency import GradientAlignment

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")  # the system browser; a test never downloads one
ANSWER = "The cat is sitting on the couch near a dog"


@pytest.fixture(scope="module")
def browser_page() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.remote = []
        page.on(
            "request",
            lambda r: None if r.url.startswith(("file:", "data:")) else page.remote.append(r.url),
        )
        yield page
        browser.close()


def _contrast(colour: str, background: str) -> float:
    """WCAG contrast ratio of two CSS ``rgb(...)`` colours (4.5 is the AA level for text)."""

    def luminance(css: str) -> float:
        channels = [int(v) / 255 for v in re.findall(r"\d+", css)[:3]]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    high, low = sorted((luminance(colour), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _check_every_word(page: Any, path: Path) -> int:
    page.goto(path.as_uri())
    buttons = page.query_selector_all("button.w")
    assert buttons, "the report has no clickable word"
    for button in buttons:
        button.click()
        key = button.get_attribute("data-k")
        visible = [
            p.get_attribute("id") for p in page.query_selector_all(".panel") if p.is_visible()
        ]
        assert visible == [f"p-{key}"], (button.text_content(), visible)
        style = button.evaluate(
            "b => [getComputedStyle(b).color, getComputedStyle(b).backgroundColor]"
        )
        assert _contrast(*style) >= 4.5, f"{button.text_content()!r} is unreadable when chosen"
        images = page.query_selector_all(f"#p-{key} img")
        assert images and all(
            img.evaluate("i => i.complete && i.naturalWidth > 0") for img in images
        )
    assert page.remote == []
    return len(buttons)


def test_explanation_report_shows_the_chosen_words_map(
    browser_page, tiny_joint, sample_images, tmp_path
):
    exp = GradientAlignment(tiny_joint).explain_answer(
        sample_images[0], "What's in the image?", ["cat", "dog"], answer=ANSWER
    )
    path = write_explanation_report(
        tmp_path, exp.image, exp.prompt, exp.answer_text, exp.word_results
    )
    assert _check_every_word(browser_page, path) == len(exp.word_results)


def test_hallucination_report_keeps_chosen_hits_and_misses_readable(
    browser_page, tiny_joint, sample_images, tmp_path
):
    report = check_hallucinations(
        tiny_joint, sample_images[0], "What's in the image?", answer=ANSWER, threshold=0.5
    )
    path = write_hallucination_report(report, tmp_path)
    assert _check_every_word(browser_page, path) == len(report.objects)
