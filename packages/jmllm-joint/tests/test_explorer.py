"""The explorer's steps without any UI: each equals what the library gives directly.

The app (``jmllm-joint app``) is a thin page over :class:`jmllm.joint.app.explorer.Explorer`; here a
chat turn is compared with ``JointModel.chat``, detections with ``JointModel.detect``, a word
click with a fresh ``GradientAlignment.attribute``, the downloadable pages with the pages the
command line writes — and the GA norm computations are counted, to prove they are cached per
(image, queries).
"""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from jmllm.joint.app.explorer import (
    Explorer,
    ExplorerError,
    ExplorerState,
    check_upload,
    parse_queries,
)
from jmllm.joint.chat import Conversation
from jmllm.joint.cli import main
from jmllm.joint.hallucination import check_hallucinations, write_hallucination_report
from jmllm.joint.model import JointAnswer
from jmllm.joint.render.drawing import SPOTLIGHT
from jmllm.joint.render.explanation import (
    BOX_VIEW_BAR,
    SHOWN_SCALE,
    box_view_image,
    map_title,
    overlay_image,
    with_colour_bar,
    write_explanation_report,
)
from jmllm.joint.saliency import GradientAlignment, OwlHeadGradients

QUESTION = "What's in the image?"


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_images) -> list[Path]:
    folder = tmp_path_factory.mktemp("explorer-images")
    paths = []
    for i, image in enumerate(sample_images[:3]):
        path = folder / f"image{i}.png"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def explorer(tiny_joint) -> Explorer:
    return Explorer(tiny_joint)


@pytest.fixture
def norm_calls(monkeypatch) -> list[int]:
    """Counts the GA gradient-norm computations (the expensive, token-independent part)."""
    calls: list[int] = []
    original = OwlHeadGradients.gradient_norms

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OwlHeadGradients, "gradient_norms", counted)
    return calls


def _answered(model, text: str, state):
    """A state whose last answer is ``text`` (teacher-forced ids), as if J had said it."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_ids = model.prompt_inputs(QUESTION)["input_ids"][0].cpu()
    result = JointAnswer(
        text=text,
        token_ids=torch.tensor(ids),
        prompt_ids=prompt_ids,
        prompt=QUESTION,
        finished=True,
    )
    conversation = Conversation().ask(QUESTION).answered(text, result)
    return dataclasses.replace(state, conversation=conversation, explained={})


# ---------------------------------------------------------------------------------- chat
def test_chat_turns_equal_the_models_own_chat(explorer, tiny_joint, images):
    state = explorer.open_image(images[0])
    state = explorer.ask(state, QUESTION, max_new_tokens=12)
    state = explorer.ask(state, "And the colours?", max_new_tokens=12)
    emb = tiny_joint.embed([images[0]])
    direct = tiny_joint.chat(emb, [QUESTION, "And the colours?"], max_new_tokens=12)
    assert [t.answer for t in state.conversation.turns] == [t.answer for t in direct.turns]
    assert torch.equal(state.last_answer.full_ids, direct.turns[-1].result.full_ids)
    assert state.stock is None
    # stock LLaVA turned on at the third turn first answers the two earlier questions itself
    state = explorer.ask(state, "Anything else?", compare=True, max_new_tokens=12)
    stock = tiny_joint.chat(
        emb, [QUESTION, "And the colours?", "Anything else?"], vision="llava", max_new_tokens=12
    )
    assert [t.answer for t in state.stock.turns] == [t.answer for t in stock.turns]
    assert len(state.stock.turns) == len(state.conversation.turns) == 3


def test_chat_template_is_used(explorer, tiny_joint, images):
    state = explorer.ask(explorer.open_image(images[1]), QUESTION, template="paper")
    direct = tiny_joint.generate(tiny_joint.embed([images[1]]), QUESTION, template="paper")[0]
    assert state.last_answer.prompt.startswith("<image>\nUSER:")
    assert torch.equal(state.last_answer.full_ids, direct.full_ids)


def test_chat_bad_input_is_named(explorer, images):
    with pytest.raises(ExplorerError, match="upload an image"):
        explorer.ask(ExplorerState(), QUESTION)
    state = explorer.open_image(images[0])
    with pytest.raises(ValueError, match="empty prompt"):
        explorer.ask(state, "   ")
    with pytest.raises(ExplorerError, match="max_new_tokens"):
        explorer.ask(state, QUESTION, max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown conversation template"):
        explorer.ask(state, QUESTION, template="vicuna")


# ---------------------------------------------------------------------------------- detection
def test_detections_for_typed_queries_equal_detect(explorer, tiny_joint, images):
    state = explorer.set_threshold(explorer.open_image(images[2]), 0.2)
    assert explorer.detect(state) is None  # nothing typed, nothing asked: no query
    state = explorer.set_queries(state, "house, tree ,house")
    assert state.typed_queries == ("house", "tree")
    found = explorer.detect(state)
    direct = tiny_joint.detect(
        tiny_joint.embed([images[2]]), ["house", "tree"], threshold=0.2, nms_iou=0.3
    )[0]
    assert found.to_records() == direct.to_records()
    assert found.image_size == (120, 48)
    picture = explorer.detections_picture(state, found)
    assert picture.size == (512, 205)  # small images are enlarged for the page, aspect kept
    other = explorer.detect(explorer.set_queries(state, "car"))
    assert other.queries == ["car"]


def test_object_words_of_the_answer_are_the_default_queries(explorer, tiny_joint, images):
    state = _answered(
        tiny_joint, "Two dogs sit near a teddy bear and a dog.", explorer.open_image(images[0])
    )
    assert explorer.queries(state) == ("dog", "teddy bear")
    assert explorer.detect(state).queries == ["dog", "teddy bear"]
    typed = explorer.set_queries(state, "cat")
    assert explorer.queries(typed) == ("cat",)
    vocabulary = Explorer(tiny_joint, objects=["red circle", "square"])
    state = _answered(tiny_joint, "A red circle and two squares.", state)
    assert vocabulary.queries(state) == ("red circle", "square")


def test_parse_queries_and_limits():
    assert parse_queries("") == ()
    assert parse_queries(["a  b", " ", "c"]) == ("a b", "c")
    with pytest.raises(ExplorerError, match="at most 16"):
        parse_queries(",".join(f"q{i}" for i in range(17)))
    with pytest.raises(ExplorerError, match="threshold"):
        Explorer.set_threshold(ExplorerState(), 1.5)


# ---------------------------------------------------------------------------------- GA
def test_word_click_equals_gradient_alignment_and_norms_are_cached(
    explorer, tiny_joint, images, norm_calls
):
    state = explorer.ask(explorer.open_image(images[0]), QUESTION, max_new_tokens=10)
    state = explorer.set_queries(state, "house, tree")
    words = explorer.words(state)
    assert len(words) >= 3
    views = []
    for n, index in enumerate([0, 2, len(words) - 1]):
        state, view = explorer.explain_word(state, index)
        assert view.norms_cached == (n > 0)
        assert len(norm_calls) == 1  # computed on the first click only
        views.append(view)
    emb = tiny_joint.embed([images[0]])
    for view in views:
        direct = GradientAlignment(tiny_joint).attribute(
            emb, QUESTION, list(view.word.positions), ["house", "tree"], answer=state.last_answer
        )
        assert view.result.target == view.word.text  # labelled by the word, as chips show it
        assert [t.position for t in view.result.tokens] == list(view.word.positions)
        torch.testing.assert_close(view.result.normalised, direct.normalised, rtol=0, atol=0)
        for weighting in ("class", "coord", "any", "gradient"):
            assert np.array_equal(view.result.map(weighting), direct.map(weighting))
    norm_calls.clear()
    # the same word again: the state already holds it, no GA work
    state, again = explorer.explain_word(state, 0)
    assert again.reused and again.result is state.explained[(0, ("house", "tree"))]
    # other queries: norms once more; back to the first queries: still cached
    other = explorer.set_queries(state, "car")
    other, view = explorer.explain_word(other, 1)
    assert not view.norms_cached and len(norm_calls) == 1
    back = explorer.set_queries(other, "house, tree")
    back, view = explorer.explain_word(back, 1)
    assert view.norms_cached and len(norm_calls) == 1
    # a second user on another image does not evict the first one's norms
    second = explorer.set_queries(explorer.open_image(images[1]), "house, tree")
    second = explorer.ask(second, QUESTION, max_new_tokens=6)
    second, view = explorer.explain_word(second, 0)
    assert not view.norms_cached and len(norm_calls) == 2
    back, view = explorer.explain_word(back, 2)
    assert view.norms_cached and len(norm_calls) == 2


def test_word_without_queries_is_its_own_query(explorer, tiny_joint, images):
    state = _answered(tiny_joint, "The cat sleeps", explorer.open_image(images[0]))
    state, view = explorer.explain_word(state, 1)
    assert view.queries == ("cat",) and view.result.queries == ["cat"]


def test_word_pictures_and_top_patches(explorer, tiny_joint, images):
    state = _answered(tiny_joint, "The cat sleeps", explorer.open_image(images[2]))
    state, view = explorer.explain_word(state, 1)
    overlay, boxes = explorer.word_pictures(state, view.result, "coord")
    image = state.emb.pil_image(0)  # 120 x 48, shown at 512 x 205 with a colour bar under it
    assert overlay.width == boxes.width == 512 and overlay.height > 205 and boxes.height > 205
    expected = overlay_image(image, view.result.shown("coord", size=(512, 205)), shown=(512, 205))
    assert np.array_equal(np.asarray(overlay)[:205], np.asarray(expected))
    # the bar is titled by what the map shows and at which contrast
    title = f"GA box-coordinate weight; {SHOWN_SCALE}"
    assert overlay == with_colour_bar(expected, SPOTLIGHT, title)
    expected = box_view_image(image, view.result, shown=(512, 205))
    assert np.array_equal(np.asarray(boxes)[:205], np.asarray(expected))
    assert boxes == with_colour_bar(expected, "viridis", BOX_VIEW_BAR)
    state, view = explorer.explain_word(explorer.set_queries(state, "cat, dog"), 1)
    for channel in ("max", 1):  # the class map and the box thickness of another channel
        overlay, boxes = explorer.word_pictures(state, view.result, "class", channel)
        saliency = view.result.shown("class", query=channel, size=(512, 205))
        expected = overlay_image(image, saliency, shown=(512, 205))
        assert np.array_equal(np.asarray(overlay)[:205], np.asarray(expected))
        query = "max" if channel == "max" else "dog"
        title = f"{map_title('class', query)}; {SHOWN_SCALE}"
        assert overlay == with_colour_bar(expected, SPOTLIGHT, title)
        expected = box_view_image(image, view.result, query=channel, shown=(512, 205))
        assert np.array_equal(np.asarray(boxes)[:205], np.asarray(expected))
        _, rows = explorer.top_patches(view.result, "class", top=1, channel=channel)
        assert rows[0][0] == int(view.result.weights("class", channel).argmax())
    with pytest.raises(ExplorerError, match="class channel"):
        explorer.word_pictures(state, view.result, "class", 2)
    blank = overlay_image(None, np.ones((4, 4)), shown=(4, 4))  # weight 1: the grey, as it is
    assert np.asarray(blank)[0, 0].tolist() == [128, 128, 128]
    headers, rows = explorer.top_patches(view.result, "class", top=3)
    weights = view.result.weights("class").numpy()
    assert [row[0] for row in rows] == list(np.argsort(-weights, kind="stable")[:3])
    assert headers[-4:] == ["cos cx", "cos cy", "cos w", "cos h"]
    _, rows = explorer.top_patches(view.result, "gradient", top=1)
    assert rows[0][0] == int(view.result.patch_gradient_norms.argmax())
    with pytest.raises(ExplorerError, match="weighting"):
        explorer.word_pictures(state, view.result, "heat")


def test_word_click_bad_input_is_named(explorer, tiny_joint, images):
    state = explorer.open_image(images[0])
    with pytest.raises(ExplorerError, match="ask J a question first"):
        explorer.explain_word(state, 0)
    state = _answered(tiny_joint, "The cat sleeps", state)
    with pytest.raises(ExplorerError, match="not a word of the answer"):
        explorer.explain_word(state, 3)


# ---------------------------------------------------------------------------------- one model
def test_one_request_at_a_time_whoever_calls(explorer, tiny_joint, images, monkeypatch):
    """Two users (two browser tabs) calling at once never run the model concurrently, and each
    keeps its own conversation."""
    running, overlaps = [0], []
    original = type(tiny_joint).generate

    def watched(self, *args, **kwargs):
        running[0] += 1
        overlaps.append(running[0])
        time.sleep(0.05)
        try:
            return original(self, *args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(type(tiny_joint), "generate", watched)
    states = [explorer.open_image(images[0]), explorer.open_image(images[1])]
    results: dict[int, object] = {}

    def user(i: int) -> None:
        s = states[i]
        for q in (f"Question {i}a?", f"Question {i}b?"):
            s = explorer.ask(s, q, max_new_tokens=4)
        results[i] = s

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(overlaps) == 1 and len(overlaps) == 4
    for i in range(2):
        assert [t.question for t in results[i].conversation.turns] == [
            f"Question {i}a?",
            f"Question {i}b?",
        ]
        assert results[i].emb is states[i].emb


# ---------------------------------------------------------------------------------- uploads
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` but whose data is a few bytes: decoding
    it would fail, so a check that passes or refuses it read the header only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def test_uploads_are_checked_from_the_header(explorer, tiny_joint, tmp_path, images):
    huge = _png_header_only(tmp_path / "huge.png", 25_000, 20_000)
    with pytest.raises(
        ExplorerError, match=r"huge\.png: image too large: 25000x20000 pixels \(500\.0 mega"
    ):
        explorer.open_image(huge)
    bomb = _png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # above PIL's own guard too
    with pytest.raises(ExplorerError, match=r"bomb\.png: image too large"):
        explorer.open_image(bomb)
    strict = Explorer(tiny_joint, max_pixels=100, max_bytes=10**6)  # the app's own limits
    with pytest.raises(ExplorerError, match=r"image0\.png: image too large: 64x64 pixels"):
        strict.open_image(images[0])
    assert check_upload(images[0]) == images[0].stat().st_size
    with pytest.raises(ExplorerError, match=r"image0\.png: file too large"):
        check_upload(images[0], max_bytes=10)
    with pytest.raises(ExplorerError, match=r"image0\.png: file too large"):
        Explorer(tiny_joint, max_bytes=10).open_image(images[0])
    with pytest.raises(ExplorerError, match=r"gone\.png: no such file"):
        explorer.open_image(tmp_path / "gone.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ExplorerError, match=r"junk\.png: not a readable image"):
        explorer.open_image(junk)
    truncated = _png_header_only(tmp_path / "cut.png", 64, 64)  # passes the header check
    with pytest.raises(ExplorerError, match=r"^upload\.png: not a readable image"):
        explorer.open_image(truncated, name="upload.png")  # named as the user knows it


def test_large_photos_keep_their_original_pixels(explorer, tmp_path):
    """A photo larger than the working size is decoded once, shrunk, and its boxes and maps are
    in its original pixels; the page shows it at most DISPLAY_SIDE wide."""
    from PIL import Image

    path = tmp_path / "wide.jpg"
    Image.new("RGB", (5000, 1000), (40, 120, 200)).save(path, quality=80)
    state = explorer.set_queries(explorer.open_image(path), "sky")
    assert state.emb.image_sizes == [(5000, 1000)]
    assert state.emb.pil_image(0).size == (1024, 205)  # what a session keeps: the page's size
    found = explorer.set_threshold(state, 0.01)
    detections = explorer.detect(found)
    assert detections.image_size == (5000, 1000)
    assert float(detections.boxes[:, 2].max()) > 4096  # boxes reach past the working copy
    assert explorer.detections_picture(found, detections).size == (1024, 205)


def _state_bytes(state: ExplorerState) -> int:
    """Bytes of the tensors a session keeps (its image copies and t)."""
    emb = state.emb
    return int(emb.t.nbytes) + sum(int(image.nbytes) for image in emb.images)


def test_a_session_keeps_the_models_inputs_not_the_upload(explorer, tmp_path):
    """64 sessions of a 4096² photo held 50 MB each (3.2 GB); now each keeps a copy at the
    page's size: the same t as from the full working copy, at most 1024 px kept."""
    from PIL import Image

    from jmllm.align.images import open_image
    from jmllm.joint.app.explorer import KEPT_SIDE

    path = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 255, (4096, 4096, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((4096, 4096)).save(path)
    state = explorer.open_image(path)
    assert max(state.emb.pil_image(0).size) == KEPT_SIDE
    assert _state_bytes(state) <= 3 * KEPT_SIDE**2 + state.emb.t.nbytes  # ~3 MB, not ~50 MB
    full = explorer.model.embed([open_image(path)])  # the whole 4096 px working copy
    assert _state_bytes(state) * 10 < int(full.images[0].nbytes)
    cosine = torch.nn.functional.cosine_similarity(state.emb.t.flatten(), full.t.flatten(), dim=0)
    assert float(cosine) > 0.99  # the model saw (nearly) the same image: it sees 768 px at most


def test_bad_uploads_are_one_sentence_naming_the_users_file(explorer, tmp_path):
    """An upload sits in the server's temporary folder; messages name it as the user does."""
    server = tmp_path / "gradio" / "0123abcd"
    server.mkdir(parents=True)
    junk = server / "holiday.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ExplorerError) as caught:
        explorer.open_image(junk, name="holiday.png")
    message = str(caught.value)
    assert message == "holiday.png: not a readable image (unknown or unsupported image format)"
    cut = _png_header_only(server / "cut.png", 64, 64)
    with pytest.raises(ExplorerError) as caught:
        explorer.open_image(cut)
    message = str(caught.value)
    assert message.startswith("cut.png: not a readable image (")
    for leak in (str(tmp_path), "gradio", "0123abcd", "<_io", "BufferedReader"):
        assert leak not in message, message
    assert message.count("\n") == 0


def test_uploads_above_the_size_limit_are_refused_before_decoding(
    tiny_joint, tmp_path, monkeypatch
):
    from jmllm.joint.app import explorer as explorer_module

    def decoded(*args, **kwargs):
        raise AssertionError("decoded although too large")

    monkeypatch.setattr(explorer_module, "open_image", decoded)
    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(b"\x89PNG" + bytes(4096))
    with pytest.raises(ExplorerError, match=r"^heavy\.png: file too large \(0\.0 MB\)"):
        Explorer(tiny_joint, max_bytes=1024).open_image(heavy)


def test_the_models_warning_about_an_image_is_kept_for_the_page(tiny_joint, tmp_path, monkeypatch):
    """The toy world warns about a photo: the page shows it (it was in the server log only)."""
    from PIL import Image

    from jmllm.joint.toy.inputs import toy_input_check
    from jmllm.joint.toy.scenes import make_scene

    monkeypatch.setattr(tiny_joint, "input_check", toy_input_check, raising=False)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 120, 40)).save(photo)
    scene = tmp_path / "scene.png"
    make_scene("heldout", 3).image.save(scene)
    explorer = Explorer(tiny_joint)
    state = explorer.open_image(photo)
    assert state.notice == toy_input_check(Image.open(photo).convert("RGB"), (300, 200))
    assert "300 × 200 pixels" in state.notice
    # the downloaded chat page heads with it too, as the command line's pages do
    assert '<p class="notice">' in explorer.report_html(state)
    assert "300 × 200 pixels" in explorer.report_html(state)
    assert explorer.open_image(scene).notice == ""
    monkeypatch.setattr(tiny_joint, "input_check", None)
    assert Explorer(tiny_joint).open_image(photo).notice == ""  # real models: no warning


def test_reset_chat_starts_over_on_the_same_image(explorer, tiny_joint, images):
    state = explorer.set_queries(explorer.open_image(images[0]), "house")
    state = explorer.ask(state, QUESTION, compare=True, max_new_tokens=6)
    state, _ = explorer.explain_word(state, 0)
    state = explorer.hallucinations(state)
    fresh = explorer.reset_chat(state)
    assert not fresh.conversation.turns and fresh.stock is None
    assert fresh.explained == {} and fresh.hallucination is None
    assert fresh.emb is state.emb and fresh.typed_queries == ("house",)
    again = explorer.ask(fresh, "Describe it.", max_new_tokens=6)
    alone = tiny_joint.chat(state.emb, "Describe it.", max_new_tokens=6)
    assert [t.answer for t in again.conversation.turns] == [t.answer for t in alone.turns]


def test_answer_length_is_bounded_by_the_models_positions(explorer, tiny_joint, images):
    positions = tiny_joint.llava.config.text_config.max_position_embeddings
    prompt = tiny_joint.prompt_inputs(["What's in the image?"])["input_ids"].shape[1]
    assert explorer.max_new_tokens == min(512, positions - prompt)
    state = explorer.open_image(images[0])
    with pytest.raises(
        ExplorerError, match=f"max_new_tokens: must be in 1..{explorer.max_new_tokens}"
    ):
        explorer.ask(state, QUESTION, max_new_tokens=explorer.max_new_tokens + 1)


# ---------------------------------------------------------------------------------- reports
def test_report_is_the_page_the_cli_writes(tiny_joint_paths, tiny_joint, images, tmp_path, capsys):
    out = tmp_path / "cli"
    # the tiny random test J as explicit sources (--tiny is the toy world)
    sources = ["--owl", str(tiny_joint_paths.owl), "--mllm", str(tiny_joint_paths.llava)]
    sources += ["--alignment", str(tiny_joint_paths.alignment), "--device", "cpu"]
    argv = ["chat", str(images[2]), *sources, "-p", QUESTION, "-p", "And then?", "--compare"]
    argv += ["-q", "house", "-q", "tree", "--threshold", "0.2", "--max-new-tokens", "8"]
    assert main([*argv, "--out", str(out)]) == 0
    explorer = Explorer(tiny_joint)
    state = explorer.set_threshold(explorer.open_image(images[2]), 0.2)
    state = explorer.set_queries(state, "house, tree")
    state = explorer.ask(state, QUESTION, compare=True, max_new_tokens=8)
    state = explorer.ask(state, "And then?", compare=True, max_new_tokens=8)
    assert explorer.report_html(state) == (out / "report.html").read_text(encoding="utf-8")


def test_explanation_and_hallucination_pages_are_the_cli_writers(
    explorer, tiny_joint, images, tmp_path
):
    state = _answered(tiny_joint, "A dog and a cat on a bench", explorer.open_image(images[0]))
    assert explorer.explanation_html(state) is None
    assert explorer.hallucination_html(state) is None
    for index in (3, 1):  # clicked out of order: the page lists them in answer order
        state, _ = explorer.explain_word(state, index)
    page = explorer.explanation_html(state, "any")
    results = [state.explained[(i, ("dog", "cat", "bench"))] for i in (1, 3)]
    written = write_explanation_report(
        tmp_path / "ga",
        state.emb.pil_image(0),
        QUESTION,
        "A dog and a cat on a bench",
        results,
        weighting="any",
        title="GA explanation of J's answer",
    )
    assert page == written.read_text(encoding="utf-8")

    state = explorer.set_threshold(explorer.set_queries(state, "car"), 0.3)
    state = explorer.hallucinations(state)
    report = state.hallucination
    direct = check_hallucinations(
        tiny_joint,
        state.emb,
        QUESTION,
        answer=state.last_answer,
        extra_queries=["car"],
        threshold=0.3,
    )
    assert report.to_json() == direct.to_json()
    path = write_hallucination_report(direct, tmp_path / "h")
    assert explorer.hallucination_html(state) == path.read_text(encoding="utf-8")
    pieces = explorer.hallucination_segments(report)
    assert "".join(text for text, _ in pieces) == report.answer_text
    labelled = [(text, label) for text, label in pieces if label]
    assert [t for t, _ in labelled] == ["dog", "cat", "bench"]
    assert {label for _, label in labelled} <= {"detected", "not detected"}
    for text, label in labelled:
        assert (label == "detected") == report.objects[text].detected


def test_every_step_works_in_bfloat16(tiny_joint_paths, images):
    """The GPU default: the whole explorer flow on a bf16 J, its results in float32."""
    from jmllm.joint import JointModel

    model = JointModel.from_pretrained(
        tiny_joint_paths.owl,
        tiny_joint_paths.llava,
        tiny_joint_paths.alignment,
        device="cpu",
        dtype=torch.bfloat16,
    )
    explorer = Explorer(model)
    state = explorer.set_queries(explorer.open_image(images[2]), "house, tree")
    state = explorer.ask(state, QUESTION, compare=True, max_new_tokens=6)
    assert explorer.detect(state).scores.dtype == torch.float32
    state, view = explorer.explain_word(state, 0)
    for name in ("similarities", "normalised", "norms", "patch_gradient_norms"):
        tensor = getattr(view.result, name)
        assert tensor.dtype == torch.float32 and bool(torch.isfinite(tensor).all()), name
    for weighting in ("class", "coord", "any", "gradient"):
        overlay, boxes = explorer.word_pictures(state, view.result, weighting)
        assert overlay.width == boxes.width == 512 and overlay.height > 205
    state, again = explorer.explain_word(state, 1)
    assert again.norms_cached
    state = explorer.hallucinations(state)
    assert explorer.report_html(state) and explorer.explanation_html(state)
    assert explorer.hallucination_html(state)
