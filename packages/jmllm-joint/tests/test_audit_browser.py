"""The hallucination audit's gallery in a real browser (Debian's headless Chromium): every picture
loads from the page itself, nothing is requested from the network, and model text or file names
shaped like HTML stay text."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from jmllm.joint.audit import AuditSettings, run_audit
from jmllm.joint.audit.data import AuditDataset, AuditImage
from jmllm.joint.audit.report import write_audit_report
from jmllm.joint.testing import generated_images

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")  # the system browser; a test never downloads one
ATTACK = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def browser_page() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.remote = []
        page.on(
            "request",
            lambda r: None if r.url.startswith(("file:", "data:")) else page.remote.append(r.url),
        )
        yield page
        browser.close()


def test_gallery_loads_every_picture_and_nothing_remote(browser_page, tiny_joint, tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = []
    for i, picture in enumerate(generated_images(3, size=96, seed=12)):
        name = f"{i}{ATTACK}.png" if i == 0 else f"{i}.png"
        picture.save(folder / name)
        images.append(AuditImage(str(i), folder / name, ("cat",) if i else (), name))
    ds = AuditDataset(("cat", "dog", "car"), tuple(images), name="browser")
    base = run_audit(
        tiny_joint, ds, tmp_path / "o", AuditSettings(max_new_tokens=2), progress=False
    )
    records = []
    for r in base.records:  # made-up answers: "yes" to everything, one answer shaped like HTML
        tokens = tuple(tiny_joint.tokenizer("Yes", add_special_tokens=False)["input_ids"])
        r = replace(r, answer="Yes", tokens=tokens, finished=True)
        if (r.image_id, r.class_name) == ("0", "dog"):  # first in the gallery
            r = replace(r, answer=f"Yes {ATTACK}", owl_score=0.999)
        records.append(r)
    report = write_audit_report(
        replace(base, records=records), model=tiny_joint, rule="pope", top_k=4, n_resamples=50
    )
    assert len(report.hallucinations) == 4 and all(h.ga_png for h in report.hallucinations)
    page = browser_page
    page.goto(report.gallery_path.as_uri())
    pictures = page.query_selector_all("img")
    assert len(pictures) == 1 + 2 * 4  # histograms, then detections + GA map per card
    for img in pictures:
        assert img.evaluate("i => i.complete && i.naturalWidth > 0"), img.get_attribute("alt")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert page.remote == []
    assert page.title() == "Hallucination audit"  # the onerror never ran
    assert page.locator("text=document.title='pwned'").count() >= 1  # shown as text
    shot = tmp_path / "gallery.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
