"""The explorer page (``jmllm-joint app``) without a browser: its wiring, its error messages,
its offline settings and its command line. The page's behaviour in a real browser is in
``test_app_browser.py``; the work behind every event in ``test_explorer.py``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from jmllm.joint.app.explorer import Explorer, ExplorerState
from jmllm.joint.cli import main


@pytest.fixture(scope="module")
def gr():
    return pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def app(gr, tiny_joint):
    from jmllm.joint.app import build_app

    return build_app(tiny_joint, notes=["random <weights>"])


def _handler(app, name: str):
    fns = [f.fn for f in app.fns.values() if f.name == name]
    assert fns, f"no event handler {name}"
    return fns[0]


def test_every_model_event_shares_one_queue_of_one(app):
    """Two tabs never run the model at once: every event that calls the explorer is in the
    same concurrency group, of size 1 (the explorer's lock also serialises them)."""
    model_events = [f for f in app.fns.values() if (f.name or "").startswith("on_")]
    assert {f.name for f in model_events} >= {
        "on_image",
        "on_ask",
        "on_queries",
        "on_threshold",
        "on_word",
        "on_hallucinations",
        "on_report",
        "on_reset",
    }
    for f in model_events:
        assert (f.concurrency_id, f.concurrency_limit, f.queue) == ("model", 1, True), f.name
    others = [f for f in app.fns.values() if f not in model_events and f.fn is not None]
    # filling the upload; showing a column (and, without Python, scrolling the chat in the page)
    assert {f.name for f in others} <= {"load_example", "<lambda>"}


def test_state_is_per_session(app, gr):
    states = [b for b in app.blocks.values() if isinstance(b, gr.State)]
    assert len(states) == 1 and isinstance(states[0].value, ExplorerState)


def test_errors_become_messages_in_the_page(app, gr, monkeypatch):
    """A failure is a notice in the page (outside a request: a Python warning) and leaves every
    output as it was: no component is put in an error state that would block it."""
    on_ask = _handler(app, "on_ask")
    with pytest.warns(
        UserWarning, match=r"^image: upload an image \(or choose an example\) first$"
    ):
        out = on_ask(ExplorerState(), "Hi?", False, "llava-1.5", 8, "first")
    assert len(out) == 12 and all(o == gr.skip() for o in out)
    explorer: Explorer = app.explorer

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory <b>")

    monkeypatch.setattr(explorer, "ask", broken)
    with pytest.warns(UserWarning) as caught:
        on_ask(ExplorerState(), "Hi?", False, "llava-1.5", 8, "first")
    assert [str(w.message) for w in caught] == ["RuntimeError: CUDA out of memory &lt;b&gt;"]
    on_report = _handler(app, "on_report")  # one output: one skip
    with pytest.warns(UserWarning, match="upload an image"):
        assert on_report(ExplorerState(), "class", "matching") == gr.skip()


def test_report_handler_writes_the_explorers_pages(app, tiny_joint, sample_images, tmp_path):
    path = tmp_path / "image.png"
    sample_images[0].save(path)
    explorer: Explorer = app.explorer
    state = explorer.ask(explorer.open_image(path), "What's in the image?", max_new_tokens=6)
    files = _handler(app, "on_report")(state, "class", "matching")
    assert [Path(f).name for f in files] == ["report.html"]  # nothing explained or checked yet
    assert Path(files[0]).read_text(encoding="utf-8") == explorer.report_html(state)
    state, _ = explorer.explain_word(state, 0)
    state = explorer.hallucinations(state)
    files = _handler(app, "on_report")(state, "coord", "matching")
    assert [Path(f).name for f in files] == [
        "report.html",
        "explanation.html",
        "hallucinations.html",
    ]
    assert Path(files[1]).read_text(encoding="utf-8") == explorer.explanation_html(state, "coord")
    # the download is the view on screen: another class channel gives another page
    files = _handler(app, "on_report")(state, "class", "max")
    assert Path(files[1]).read_text(encoding="utf-8") == explorer.explanation_html(
        state, "class", "max"
    )
    assert explorer.explanation_html(state, "class", "max") != explorer.explanation_html(
        state, "class", "matching"
    )


def test_offline_theme_fetches_no_font(gr):
    from jmllm.joint.app import offline_theme

    theme = offline_theme()
    css = theme._get_theme_css()
    assert theme._stylesheets == []
    urls = [u.strip("'\" ") for u in re.findall(r"url\(([^)]*)\)", css)]
    assert urls and all(u.startswith("data:") for u in urls)  # inline SVG icons only
    assert "@import" not in css and "@font-face" not in css
    assert "system-ui" in css


def test_analytics_are_off_for_the_process(gr):
    import os

    from jmllm.joint.app import require_gradio

    require_gradio()
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    from gradio import analytics

    assert not analytics.analytics_enabled()


# ---------------------------------------------------------------------------------- CLI
def test_app_without_gradio_names_the_extra(cli_env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    assert main(["app", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        'jmllm-joint app: error: the explorer app needs Gradio: pip install "jmllm-joint[app]"'
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "0"], "argument --port: must be in [1, 65535], got 0"),
        (["--port", "70000"], "argument --port: must be in [1, 65535], got 70000"),
        (["--max-upload-mb", "nan"], "argument --max-upload-mb: must be a finite number"),
        (["--max-upload-mb", "0"], "argument --max-upload-mb: must be > 0"),
        (["--max-pixels", "0"], "argument --max-pixels: must be in [1, 4e+08], got 0"),
        (
            ["--max-pixels", "400000001"],
            "argument --max-pixels: must be in [1, 4e+08], got 400000001",
        ),
    ],
)
def test_app_bad_numbers_are_refused_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["app", "--tiny", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--objects", " , "], "--objects: empty list"), (["--host", " "], "--host: empty")],
)
def test_app_bad_options(argv, message, capsys):
    assert main(["app", "--tiny", *argv]) == 2
    assert message in capsys.readouterr().err


def test_app_serves_the_built_in_models_on_loopback(gr, cli_env, monkeypatch):
    """``--tiny`` goes through the shared resolver (load_model); the page is built on that model
    and served on 127.0.0.1 with the limits given."""
    import jmllm.joint.app.page as app_module
    import jmllm.joint.cli.common as cli

    loaded, served = [], []
    real_load = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda args: loaded.append(args) or real_load(args))
    monkeypatch.setattr(app_module, "launch", lambda app, **kw: served.append((app, kw)))
    assert main(["app", "--tiny", "--port", "7999", "--max-upload-mb", "2"]) == 0
    assert loaded[0].tiny
    app, kwargs = served[0]
    assert kwargs == {"host": "127.0.0.1", "port": 7999, "max_file_size": 2 * 2**20}
    assert app.explorer.max_bytes == 2 * 2**20
    # the built-in models are the toy world: its model, its shapes, its scenes, its note
    assert app.explorer.model.sources["owl"] == str(cli.builtin_sources().owl)
    assert app.explorer.objects == ["circle", "square", "triangle", "cross"]
    texts = [str(getattr(b, "value", "")) for b in app.blocks.values()]
    assert any("trained on synthetic" in t for t in texts)
    assert not any("random weights" in t for t in texts)


def _component(app, elem_id: str):
    found = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def test_page_controls_of_a_product(app, gr, tiny_joint):
    """The answer length is bounded by the model's positions; a chat can be started over; the
    chat panels do not jump to the bottom of an answer (a script shows its top instead); the
    model's warning about an image has its place on the page."""
    slider = _component(app, "jm-max-tokens")
    assert slider.maximum == app.explorer.max_new_tokens < 512  # the tiny LLaVA's 256 positions
    assert slider.value <= slider.maximum
    assert isinstance(_component(app, "jm-reset"), gr.Button)
    assert _component(app, "jm-chat").autoscroll is False
    scrolls = [f for f in app.fns.values() if f.fn is None and f.js]
    assert scrolls and all("scrollTop" in f.js for f in scrolls)
    notice = _component(app, "jm-image-notice")
    assert notice.visible is False  # until an image gets a warning


def test_uploads_and_results_are_deleted_when_old(gr, tiny_joint, tmp_path, monkeypatch):
    """Gradio's delete_cache is set: an upload is gone once older than its age (20 uploads used
    to add 149 MB for the server's lifetime)."""
    import json
    import time
    import urllib.request
    import uuid

    from jmllm.joint.app import DELETE_CACHE, build_app, launch

    assert build_app(tiny_joint).delete_cache == DELETE_CACHE
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    app = build_app(tiny_joint, delete_cache=(1, 1))
    launch(app, port=None, block=False, quiet=True)
    try:
        image = tmp_path / "upload.png"
        Image.new("RGB", (32, 32), (9, 9, 9)).save(image)
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                f'filename="upload.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + image.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            app.local_url.rstrip("/") + "/gradio_api/upload",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            (stored,) = json.loads(response.read())
        assert Path(stored).is_file() and str(tmp_path / "gradio") in stored
        deadline = time.monotonic() + 60
        while Path(stored).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(stored).exists()
    finally:
        app.close()


def test_launch_prints_where_the_page_is_and_no_share_link_banner(gr, tiny_joint, capsys):
    from jmllm.joint.app import build_app, launch

    app = build_app(tiny_joint)
    launch(app, port=None, block=False)
    try:
        out = capsys.readouterr()
        text = out.out + out.err
        assert re.search(r"jmllm explorer: http://127\.0\.0\.1:\d+/ \(Ctrl-C stops it\)", text)
        assert "share" not in text.lower() and "public link" not in text.lower()
    finally:
        app.close()


def test_builtin_examples_are_toy_scenes_the_toy_j_gets_right(tmp_path, toy_joint):
    from jmllm.joint.app import builtin_examples
    from jmllm.joint.toy.inputs import toy_image_problem
    from jmllm.joint.toy.scenes import CONTENT_QUESTION, make_scene

    model = toy_joint
    paths = builtin_examples(tmp_path)
    assert len(paths) >= 3
    for path in paths:
        index = int(path.stem.rsplit("-", 1)[1])
        scene = make_scene("heldout", index)
        assert toy_image_problem(Image.open(path)) is None
        assert model.generate(model.embed([path]), CONTENT_QUESTION)[0].text == scene.caption
