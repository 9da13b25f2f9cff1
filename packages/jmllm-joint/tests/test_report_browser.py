"""The pages in a real browser (Debian's headless Chromium): the demo report, the explanation
report, the hallucination view and the WSOL page.

Choosing a word must show that word's panel and only it, the word picker must follow the click,
the chosen word must stay readable (whatever its hit/miss colour), maps must sit side by side at
1280 px using the page's width, labels drawn in pictures must stay inside them and never overlap,
links must be links, and no page may load anything from the network.

Set ``JMLLM_DOCS_SCREENSHOTS=1`` to write the screenshots the docs show into ``docs/images``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jmllm.joint.hallucination import check_hallucinations, write_hallucination_report
from jmllm.joint.render.explanation import write_explanation_report
from jmllm.joint.render.report import write_report
from jmllm.joint.saliency import GradientAlignment
from jmllm.joint.wsol import run_wsol

pytestmark = pytest.mark.browser

DOCS_IMAGES = Path(__file__).resolve().parents[3] / "docs" / "images"
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
        page = browser.new_page(viewport={"width": 1280, "height": 900})
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


# The docs show these pages on the toy world: docs/screenshots.py takes them, not these tests,
# whose tiny random models would put noise in the docs.
TAKEN_ON_THE_TOY_WORLD = {"report-demo.png", "report-explanation.png", "report-hallucination.png"}


def _screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """The whole page as a PNG: into ``docs/images`` with ``JMLLM_DOCS_SCREENSHOTS=1`` (the
    pictures the docs show, except those of :data:`TAKEN_ON_THE_TOY_WORLD`), else into the
    test's folder."""
    to_docs = os.environ.get("JMLLM_DOCS_SCREENSHOTS") and name not in TAKEN_ON_THE_TOY_WORLD
    folder = DOCS_IMAGES if to_docs else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a picture, not a blank page
    return path


def _check_side_by_side(page: Any, selector: str) -> None:
    """The pictures of ``selector`` (a pair) share a row and use most of the page's width."""
    boxes = [img.bounding_box() for img in page.query_selector_all(selector)]
    assert len(boxes) == 2 and all(b and b["width"] > 0 for b in boxes), boxes
    left, right = sorted(boxes, key=lambda b: b["x"])
    assert abs(left["y"] - right["y"]) < 2 and right["x"] >= left["x"] + left["width"], boxes
    width = page.evaluate("document.documentElement.clientWidth")
    assert right["x"] + right["width"] - left["x"] > 0.7 * min(width, 1400), (boxes, width)
    assert right["x"] + right["width"] <= width  # nothing runs off the page


def _check_labels(page: Any) -> int:
    """Every labelled picture: its labels inside the picture and pairwise apart, and the
    picture drawn whole (not cropped by the page)."""
    count = 0
    for img in page.query_selector_all("img.labelled"):
        img.scroll_into_view_if_needed()
        natural = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        shown = img.evaluate("i => [i.clientWidth, i.clientHeight]")
        assert natural[0] > 0 and abs(shown[0] / natural[0] - shown[1] / natural[1]) < 0.02
        rects = [label["rect"] for label in json.loads(img.get_attribute("data-labels"))]
        for i, (x0, y0, x1, y1) in enumerate(rects):
            assert 0 <= x0 < x1 <= natural[0] and 0 <= y0 < y1 <= natural[1]
            for a0, b0, a1, b1 in rects[i + 1 :]:
                assert not (x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1)
        count += len(rects)
    return count


def _check_every_word(page: Any, path: Path) -> int:
    page.goto(path.as_uri())
    buttons = page.query_selector_all("button.w")
    assert buttons, "the report has no clickable word"
    for button in buttons:
        button.click()
        key = button.get_attribute("data-k")
        picker = page.query_selector("#pick")
        if picker is not None:  # the word picker follows the clicked word
            assert picker.evaluate("s => s.value") == key
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
        _check_side_by_side(page, f"#p-{key} .maps img")
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
    # before any click the page shows the first word naming a query ("cat", word 2), not "The"
    browser_page.goto(path.as_uri())
    shown = [
        p.get_attribute("id") for p in browser_page.query_selector_all(".panel") if p.is_visible()
    ]
    assert shown == ["p-r1"] and browser_page.eval_on_selector("#pick", "s => s.value") == "r1"
    assert browser_page.get_attribute("button.w[data-k='r1']", "aria-pressed") == "true"
    assert _check_every_word(browser_page, path) == len(exp.word_results)
    labels = browser_page.eval_on_selector_all("#pick option", "os => os.map(o => o.textContent)")
    assert len(set(labels)) == len(labels) == len(exp.word_results)  # repeated words told apart
    browser_page.select_option("#pick", "r2")  # and the picker shows its word
    assert browser_page.is_visible("#p-r2") and not browser_page.is_visible("#p-r0")
    _screenshot(browser_page, "report-explanation.png", tmp_path)


def test_hallucination_report_keeps_chosen_hits_and_misses_readable(
    browser_page, tiny_joint, sample_images, tmp_path
):
    report = check_hallucinations(
        tiny_joint, sample_images[0], "What's in the image?", answer=ANSWER, threshold=0.5
    )
    path = write_hallucination_report(report, tmp_path)
    assert _check_every_word(browser_page, path) == len(report.objects)
    assert _check_labels(browser_page) >= 1
    _screenshot(browser_page, "report-hallucination.png", tmp_path)


def test_demo_report_links_the_explanation_and_keeps_labels_apart(
    browser_page, tiny_joint, sample_images, tmp_path
):
    image = sample_images[0].resize((320, 240))
    emb = tiny_joint.embed(image)
    detections = tiny_joint.detect(emb, ["cat", "dog", "grass", "sky"], threshold=0.0)[0]
    (tmp_path / "explanation").mkdir()
    (tmp_path / "explanation" / "report.html").write_text("<title>explained</title>")
    path = write_report(
        tmp_path / "report.html",
        image,
        detections=detections,
        links=[("GA explanation", "explanation/report.html")],
        max_boxes=12,
    )
    browser_page.goto(path.as_uri())
    _check_side_by_side(browser_page, ".images img")
    assert _check_labels(browser_page) >= 3
    _screenshot(browser_page, "report-demo.png", tmp_path)
    browser_page.click("a:has-text('GA explanation')")
    browser_page.wait_for_load_state()
    assert browser_page.url.endswith("/explanation/report.html")
    assert browser_page.title() == "explained"
    assert browser_page.remote == []


def test_wsol_page_shows_the_metric_and_a_sample_of_maps(
    browser_page, tiny_joint, sample_images, tmp_path
):
    root = tmp_path / "cub"
    (root / "images").mkdir(parents=True)
    rows = ["image_id,x0,y0,x1,y1"]
    for i, image in enumerate(sample_images):
        image.save(root / "images" / f"bird_{i}.png")
        w, h = image.size
        rows.append(f"bird_{i}.png,{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    report = run_wsol(tiny_joint, root, progress=False, protocol="exact")
    path = report.save_page(tmp_path / "wsol.html")
    browser_page.goto(path.as_uri())
    assert "MaxBoxAccV2" in browser_page.inner_text("table.metric")
    sections = browser_page.query_selector_all("section.sample")
    assert len(sections) == 3
    for section in sections:
        images = section.query_selector_all("img")
        assert all(i.evaluate("i => i.complete && i.naturalWidth > 0") for i in images)
        captions = " ".join(c.inner_text() for c in section.query_selector_all("figcaption"))
        assert captions.count("best IoU") == 2
    section_id = sections[0].query_selector("h3").inner_text()
    assert section_id == "bird_0.png"
    _check_side_by_side(browser_page, ".samples > section:first-child img")
    assert _check_labels(browser_page) >= 6  # a predicted box and the truth per picture
    _screenshot(browser_page, "report-wsol.png", tmp_path)
    assert browser_page.remote == []
