from __future__ import annotations

import base64
import doctest
import hashlib
import html
import http.client
import importlib
import json
import re
import sys
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from jmllm.userstudy.from_joint import MissingExtraError, joint_explainer, write_explanations
from jmllm.userstudy.render import image_data_url, render_questionnaire
from jmllm.userstudy.serve import make_server
from jmllm.userstudy.testing import answers_document


def test_questionnaire_is_self_contained(example_spec):
    page = render_questionnaire(example_spec)
    # Every src/href is a data: URL; nothing names a network location.
    markup = page.split('<script type="application/json"')[0]
    assert "<img" in markup and not re.search(r"\s(src|href|srcset|action)\s*=", markup)
    assert "://" not in page and "@import" not in page and "url(" not in page
    study = json.loads(re.search(r'id="study-data">(.*?)</script>', page, re.S).group(1))
    assert study["fingerprint"] == example_spec.fingerprint()
    assert [q["id"] for q in study["questions"]] == ["q1", "q2", "q3", "q4", "q5"]
    assert all(
        u.startswith("data:image/png;base64,")
        for q in study["questions"]
        for u in q["explanations"]
    )


def test_csp_allows_exactly_the_inline_script_and_style(example_spec):
    page = render_questionnaire(example_spec)
    csp = html.unescape(
        re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    )
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    for source in (script, style):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "img-src data:" in csp


def test_images_browsers_cannot_show_are_converted(tmp_path):
    Image.new("CMYK", (3, 2)).save(tmp_path / "c.tiff")
    url = image_data_url(tmp_path / "c.tiff")
    assert url.startswith("data:image/png;base64,")
    jpeg = tmp_path / "x.jpg"
    Image.new("RGB", (3, 2)).save(jpeg)
    assert base64.b64decode(image_data_url(jpeg).split(",", 1)[1]) == jpeg.read_bytes()


def _post(url, body, content_type="application/json"):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def server(example_spec, tmp_path):
    server = make_server(example_spec, tmp_path / "answers", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}", tmp_path / "answers"
    server.shutdown()
    server.server_close()


def test_server_stores_valid_submissions_and_refuses_others(server, example_spec):
    base, answers = server
    with urllib.request.urlopen(base + "/", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.read().decode() == render_questionnaire(example_spec)
    doc = answers_document(example_spec, "../../etc/passwd", correct={"q1"})
    status, reply = _post(base + "/submit", json.dumps(doc).encode())
    assert status == 201
    stored = answers / reply["stored"]
    assert stored.parent == answers and "/" not in reply["stored"]
    assert json.loads(stored.read_text()) == doc

    foreign = {**doc, "spec_fingerprint": "0" * 64}
    assert _post(base + "/submit", json.dumps(foreign).encode())[0] == 409
    assert _post(base + "/submit", b"{not json")[0] == 400
    assert _post(base + "/submit", b'{"format": "x"}')[0] == 400
    assert _post(base + "/submit", json.dumps(doc).encode(), "text/plain")[0] == 415
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    connection.putrequest("POST", "/submit")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "1000001")
    connection.endheaders()
    assert connection.getresponse().status == 413  # refused before reading the body
    connection.close()
    assert _post(base + "/elsewhere", json.dumps(doc).encode())[0] == 404
    assert len(list(answers.iterdir())) == 1


def test_joint_hook_reports_a_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jmllm.joint", None)  # import now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'jmllm-userstudy\[joint\]'"):
        joint_explainer()


def test_joint_hook_draws_each_object_with_the_joint_model(tmp_path, shared_tiny):
    """With the extra installed, joint_explainer draws J's GA explanation of each object."""
    joint = pytest.importorskip("jmllm.joint")
    testing = pytest.importorskip("jmllm.joint.testing")
    model = testing.tiny_joint_model(shared_tiny)
    testing.generated_images(1, size=64, seed=3)[0].save(tmp_path / "q.png")
    with testing.record_prompts() as sent:
        first, second = write_explanations(
            tmp_path / "q.png",
            ("cat", "TV/monitor"),
            tmp_path / "maps",
            joint_explainer(model=model),
        )
    # the paper's setting: J asked in the authors' conversation template, verbatim
    assert sent == ["<image>\nUSER: What's in the image?\nASSISTANT:"] * 2
    with testing.record_prompts() as sent:
        joint_explainer(model=model, template="llava-1.5")(Image.new("RGB", (8, 8)), "cat")
    assert sent == ["USER: <image>\nWhat's in the image? ASSISTANT:"]
    # each file is exactly jmllm.joint.explain_object's picture of its object
    with Image.open(tmp_path / "q.png") as source:
        picture = source.convert("RGB")
    for path, name in ((first, "cat"), (second, "TV/monitor")):
        with Image.open(path) as written:
            assert written.tobytes() == joint.explain_object(picture, name, model=model).tobytes()
    with pytest.raises(TypeError, match="model"):
        joint_explainer()(Image.new("RGB", (8, 8)), "cat")


def test_joint_hook_writes_one_map_per_object(tmp_path):
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "q.png")
    calls = []

    def explain(image, name):
        calls.append((image.size, name))
        return Image.new("L", image.size, 255 if name == "cat" else 0)

    first, second = write_explanations(
        tmp_path / "q.png", ("cat", "TV/monitor"), tmp_path / "maps", explain
    )
    assert calls == [((8, 6), "cat"), ((8, 6), "TV/monitor")]
    assert (first.name, second.name) == ("q_cat.png", "q_TV_monitor.png")
    assert Image.open(first).getpixel((0, 0)) == 255 and Image.open(second).getpixel((0, 0)) == 0
    with pytest.raises(TypeError, match="not a PIL image"):
        write_explanations(tmp_path / "q.png", ("a", "b"), tmp_path, lambda im, name: None)


@pytest.mark.parametrize(
    "module",
    [
        "spec",
        "randomisation",
        "render",
        "score",
        "report",
        "testing",
        "example",
        "atomic",
        "from_joint",
        "serve",
        "conventions",
        "participants",
    ],
)
def test_docstring_examples(module):
    mod = importlib.import_module(f"jmllm.userstudy.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_serve_command_serves_until_interrupted(example_dir, tmp_path):
    import signal
    import subprocess

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jmllm.userstudy.cli",
            "serve",
            str(example_dir / "study.yaml"),
            "--answers",
            str(tmp_path / "answers"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches it even when the tests run in a background job (SIGINT ignored there)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line).group(1)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b'id="study-data"' in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
