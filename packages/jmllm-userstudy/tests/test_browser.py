"""Real-browser tests: Debian's headless Chromium opens the rendered questionnaire."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from jmllm.userstudy.participants import normalise_participant_id
from jmllm.userstudy.randomisation import participant_order, participant_seed
from jmllm.userstudy.render import explanation_data_url, image_data_url, write_questionnaire
from jmllm.userstudy.score import score_answers
from jmllm.userstudy.serve import make_server
from jmllm.userstudy.spec import StudySpec, answer_text, load_spec, question_text

pytestmark = pytest.mark.browser

FLIP = {"A1": "A2", "A2": "A1"}


def answer_questionnaire(page: Any, spec: StudySpec, pid: str, plan: dict[str, bool]) -> None:
    """Answer as a participant: start with the keyboard, then alternate mouse clicks and keyboard
    (Tab, arrows/Space, Enter), check each screen shows what the seed says, visit Previous once.

    ``plan[question_id]`` says whether to answer that question correctly.
    """
    page.wait_for_selector("html[data-ready=true]", state="attached")
    page.click("#start-button")  # no id yet
    assert page.text_content("#start-error") == "Please enter your participant ID."
    assert page.get_attribute("#participant-id", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "participant-id"
    page.keyboard.type(pid)
    page.keyboard.press("Enter")

    # the questionnaire seeds the order with the id's normal form
    order = participant_order(
        [q.id for q in spec.questions], spec.seed, normalise_participant_id(pid)
    )
    n = len(order)
    k = 0
    went_back = False
    while k < n:
        shown = order[k]
        q = spec.question(shown.question_id)
        assert page.text_content("#progress") == f"Question {k + 1} of {n}"
        assert page.text_content("#question-text") == question_text(q.objects)
        for a in ("A1", "A2"):
            assert page.text_content(f"#answer-{a}-text") == answer_text(a, q.objects)
        on_page = q.page_explanations()
        first, second = on_page[::-1] if shown.swapped else on_page
        assert page.get_attribute("#img-expl-1", "src") == explanation_data_url(first)
        assert page.get_attribute("#img-expl-2", "src") == explanation_data_url(second)
        assert page.get_attribute("#img-image", "src") == image_data_url(q.image)

        wanted = q.correct if plan[q.id] else FLIP[q.correct]
        # A1/A2 as the participant sees them: flipped when the screen shows the spec's
        # explanation 2 as "Explanation 1" (read from the pixels on screen, not from the seed)
        spec_first_on_screen = page.get_attribute("#img-expl-1", "src") == explanation_data_url(
            q.explanations[0]
        )
        choice = wanted if spec_first_on_screen else FLIP[wanted]
        if k == 0:
            page.click("#next")  # nothing chosen yet
            assert page.text_content("#question-error") == "Please choose A1 or A2 to continue."
            assert page.text_content("#progress") == "Question 1 of 5"
        if k % 2 == 0:
            page.click(f"label[for=answer-{choice}]")
            assert page.is_checked(f"#answer-{choice}")
            page.click("#next")
        else:
            assert page.evaluate("document.activeElement.id") == "progress"
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") in ("answer-A1", "answer-A2")
            if choice == "A1":
                page.keyboard.press("Space")
            else:
                page.keyboard.press("ArrowDown")
            assert page.is_checked(f"#answer-{choice}")
            page.keyboard.press("Enter")
        if k == 2 and not went_back:
            went_back = True
            page.click("#prev")  # back to the question just answered: the choice is kept
            assert page.text_content("#progress") == f"Question {k + 1} of {n}"
            assert page.is_checked(f"#answer-{choice}") and not page.is_checked(
                f"#answer-{FLIP[choice]}"
            )
            page.click("#next")
        k += 1
    assert page.is_visible("#finish") and not page.is_visible("#question")
    assert page.text_content("#summary") == f"You answered {n} of {n} questions."


def download_answers(page: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    page.focus("#download")
    with page.expect_download() as info:
        page.keyboard.press("Enter")
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target


PLAN = {"q1": True, "q2": False, "q3": True, "q4": True, "q5": False}


def test_participant_flow_from_file_and_scoring(page, example_spec, tmp_path):
    site = write_questionnaire(example_spec, tmp_path / "site")
    page.goto(site.as_uri())
    assert not page.is_visible("#send")
    answer_questionnaire(page, example_spec, "P-01", PLAN)
    assert not page.is_visible("#send")  # no server behind a file:// page
    assert page.text_content("#finish-help") == (
        "Download your answers and send the file to the researcher."
    )
    saved = download_answers(page, tmp_path / "answers")
    assert saved.name == f"answers-p-01-{example_spec.fingerprint()[:8]}.json"

    # A second participant, same page reloaded.
    page.reload()
    answer_questionnaire(page, example_spec, "P-02", dict.fromkeys(PLAN, True))
    download_answers(page, tmp_path / "answers")

    result = score_answers(example_spec, tmp_path / "answers")
    assert result.problems == ()
    assert {q.question_id: q.rate.correct for q in result.questions} == {
        q: 1 + int(ok) for q, ok in PLAN.items()
    }
    assert [(p.participant_id, p.rate.correct) for p in result.participants] == [
        ("p-01", 3),
        ("p-02", 5),
    ]
    assert page.errors == [] and page.external_requests == []


def test_browser_and_python_draw_the_same_orders(page, example_spec, tmp_path):
    page.goto(write_questionnaire(example_spec, tmp_path).as_uri())
    page.wait_for_selector("html[data-ready=true]", state="attached")
    ids = [f"q{i}" for i in range(9)]
    cases = [(2024, f"participant-{i}") for i in range(150)] + [
        (0, "P1"),
        (2**53 - 1, "ünïcödé 参加者 🙂"),
        (7, 'quote" <tag> & \\ back'),
        (7, "lone \ud800 surrogate"),
    ]
    js = page.evaluate(
        """([ids, cases]) => cases.map(([s, p]) => [
            window.jmllmUserstudy.participantSeed(s, p),
            window.jmllmUserstudy.participantOrder(ids, s, p)])""",
        [ids, cases],
    )
    for (seed, pid), (js_seed, js_order) in zip(cases, js, strict=True):
        assert js_seed == participant_seed(seed, pid)
        assert js_order == [
            {"position": s.position, "question_id": s.question_id, "swapped": s.swapped}
            for s in participant_order(ids, seed, pid)
        ]


LOOK_ALIKE_IDS = [
    "P01", " P01 ", "p01", "\uff30\uff10\uff11", "P\u200b01", "\ufeffP01", "P\u00ad01",
    "P\u200d0\u200c1", "  Anna\u00a0\u00a0Maria ", "STRASSE", "Stra\u00dfe", "\u1e9e",
    "\u03a3\u039f\u03a6\u0399\u0391\u03a3", "\u03c3\u03bf\u03c6\u03b9\u03b1\u03c2",
    "\ufb01le", "\u2460", "\u00b5", "K\u212a", "\u0130stanbul", "caf\u00e9", "cafe\u0301",
    "\u3000\u53c2\u52a0\u8005\u3000", "\u2028x\u2029", "", "\u200b",
]  # fmt: skip


def test_browser_and_python_normalise_participant_ids_alike(page, example_spec, tmp_path):
    """The questionnaire's normal form of an id is participants.normalise_participant_id's: the
    order a participant sees and the id scoring groups them by agree."""
    page.goto(write_questionnaire(example_spec, tmp_path).as_uri())
    page.wait_for_selector("html[data-ready=true]", state="attached")
    js = page.evaluate(
        "(ids) => ids.map((p) => window.jmllmUserstudy.normaliseParticipantId(p))",
        LOOK_ALIKE_IDS,
    )
    assert js == [normalise_participant_id(p) for p in LOOK_ALIKE_IDS]
    assert len({normalise_participant_id(p) for p in LOOK_ALIKE_IDS[:8]}) == 1


def test_html_in_spec_and_participant_id_renders_as_text(page, example_dir, spec_editor, tmp_path):
    evil_object = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    evil_title = "</title><script>window.__pwned = 3</script>"
    evil_text = '<img src=x onerror="window.__pwned = 4"> & </p>'
    spec_editor(example_dir, '["person", "boat"]', f"['{evil_object}', 'boat']")
    spec_editor(
        example_dir, "title: Which explanation is for which object?", f"title: '{evil_title}'"
    )
    path = spec_editor(example_dir, "seed: 2024\n", f"seed: 2024\ninstructions: '{evil_text}'\n")
    spec = load_spec(path)
    site = write_questionnaire(spec, tmp_path / "site")
    assert "<script>window.__pwned" not in site.read_text()
    page.goto(site.as_uri())
    assert page.text_content("h1") == evil_title
    assert page.title() == evil_title
    assert page.text_content("#start p") == evil_text
    evil_pid = '<b id="bold">P</b><img src=x onerror="window.__pwned = 5">'
    page.fill("#participant-id", evil_pid)
    page.click("#start-button")
    assert page.text_content("#participant-label") == normalise_participant_id(evil_pid)
    order = participant_order(
        [q.id for q in spec.questions], spec.seed, normalise_participant_id(evil_pid)
    )
    for k, shown in enumerate(order):
        q = spec.question(shown.question_id)
        if q.id == "q3":
            assert page.text_content("#question-text") == question_text(q.objects)
            assert evil_object in page.text_content("#answer-A1-text")
        page.click("label[for=answer-A1]")
        page.click("#next")
        assert k < len(order)
    # Nothing injected: no script ran, no extra element exists.
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.scripts.length") == 2
    assert page.evaluate("document.images.length") == 3
    assert page.evaluate("document.getElementById('bold')") is None
    saved = download_answers(page, tmp_path / "answers")
    assert re.fullmatch(r"answers-[A-Za-z0-9_-]+-[0-9a-f]{8}\.json", saved.name)
    result = score_answers(spec, tmp_path / "answers")
    assert [p.participant_id for p in result.participants] == [normalise_participant_id(evil_pid)]
    assert page.errors == []


def test_served_questionnaire_posts_answers_once(page, example_spec, tmp_path, caplog):
    """Served, the finish page offers one way back (Send), says nothing about downloading a
    file, and Send works once: a double click stores one submission, and the server logs it
    with the participant id and nothing else of the answers."""
    caplog.set_level(logging.INFO, logger="jmllm.userstudy.serve")
    answers = tmp_path / "answers"
    server = make_server(example_spec, answers, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        page.goto(f"http://{host}:{port}/")
        # the default instructions leave the way back to the last page (here: Send)
        assert "download" not in page.inner_text("body").lower()
        answer_questionnaire(page, example_spec, "S1", PLAN)
        assert page.is_visible("#send") and not page.is_visible("#download")
        finish_text = page.inner_text("#finish")  # what is shown
        assert "download" not in finish_text.lower() and "send the file" not in finish_text
        assert "Send answers" in page.text_content("#finish-help")
        page.dblclick("#send")
        # expect() polls without eval, which the page's Content-Security-Policy forbids
        expect(page.locator("#send-status")).to_have_text("Your answers were sent. Thank you!")
        assert not page.is_visible("#send")  # nothing left to press
    finally:
        server.shutdown()
        server.server_close()
    (stored,) = answers.iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z-s1-[0-9a-f]{8}\.json", stored.name)
    result = score_answers(example_spec, answers)
    assert [(p.participant_id, p.rate.correct) for p in result.participants] == [("s1", 3)]
    logged = [r.getMessage() for r in caplog.records if r.name == "jmllm.userstudy.serve"]
    assert logged == [f"stored the answers of participant 's1' as {stored.name}"]
    assert page.errors == []


def _luminance(rgb: tuple[int, ...]) -> float:
    lin = [
        c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (v / 255 for v in rgb)
    ]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _rgb(css: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", css)[:3])


def test_question_screen_layout_at_1280_px(chromium, example_spec, tmp_path):
    """What a participant sees: the image and both explanations fully on screen at 1280 px, the
    two explanations side by side at the same size, the question and answers readable (WCAG AA
    contrast). The screenshot is kept in the test's folder (the docs' picture,
    ``docs/images/userstudy-question.png``, is the toy world's example: ``docs/screenshots.py``)."""
    site = write_questionnaire(example_spec, tmp_path / "site")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(site.as_uri())
    page.wait_for_selector("html[data-ready=true]", state="attached")
    page.fill("#participant-id", "P-01")
    page.click("#start-button")
    page.wait_for_selector("#question", state="visible")
    for sel in ("#img-image", "#img-expl-1", "#img-expl-2"):
        page.wait_for_function(f"document.querySelector('{sel}').complete")
    boxes = {
        sel: page.locator(sel).bounding_box()
        for sel in ("#img-image", "#img-expl-1", "#img-expl-2")
    }
    for sel, box in boxes.items():
        assert box is not None and box["width"] >= 200 and box["height"] >= 150, (sel, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= 1280, (sel, box)  # not clipped
    e1, e2 = boxes["#img-expl-1"], boxes["#img-expl-2"]
    assert abs(e1["y"] - e2["y"]) < 2 and e1["x"] + e1["width"] <= e2["x"]  # side by side
    assert abs(e1["width"] - e2["width"]) < 2 and abs(e1["height"] - e2["height"]) < 2
    for sel in ("#question-text", "#answer-A1-text", "#answer-A2-text"):
        colour, background = page.evaluate(
            """sel => {
                const el = document.querySelector(sel);
                let bg = 'rgba(0, 0, 0, 0)', node = el;
                while (node && /rgba\\(0, 0, 0, 0\\)|transparent/.test(bg)) {
                    bg = getComputedStyle(node).backgroundColor; node = node.parentElement;
                }
                return [getComputedStyle(el).color, /rgba\\(0, 0, 0, 0\\)/.test(bg) ? 'rgb(255, 255, 255)' : bg];
            }""",
            sel,
        )
        hi, lo = sorted((_luminance(_rgb(colour)), _luminance(_rgb(background))), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5, (sel, colour, background)
    shot = tmp_path / "userstudy-question.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    context.close()
