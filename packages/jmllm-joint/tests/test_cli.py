"""The jmllm-joint command line: demo report, commands, and one-line errors for bad input."""

from __future__ import annotations

import html
import io
import json
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

from jmllm.joint import cli


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (60, 40), (30, 120, 200)).save(path)
    return path


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


def test_demo_runs_the_toy_world_and_is_right_about_its_scene(
    tmp_path, capsys, caplog, monkeypatch
):
    """The main job: the trained toy J on a held-out scene answers correctly, finds each object
    (and nothing else), and GA's map of every object word lands on that object."""
    from jmllm.joint.toy.scenes import make_scene

    scene = make_scene(*cli.TOY_DEMO_SCENE)
    out = tmp_path / "demo"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as in a terminal
    assert cli.main(["demo", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "loading the built-in toy-world models" in captured.err  # the pause has a reason
    assert "toy-world models" in printed and "--alignment" in printed
    assert "mean nothing" not in caplog.text  # a toy scene raises no photo warning
    record = json.loads((out / "result.json").read_text())
    answers = [turn["answer"] for turn in record["conversation"]]
    assert answers[0] == scene.caption  # "a yellow triangle and a green cross"
    triangle = next(o for o in scene.objects if o.shape == "triangle")
    assert answers[1] == triangle.colour
    assert record["stock_llava"][0] == scene.caption  # stock toy LLaVA beside J
    page = (out / "report.html").read_text()
    for turn in record["conversation"]:
        assert html.escape(turn["answer"]) in page and html.escape(turn["question"]) in page
    assert "Stock LLaVA" in page and "toy-world models" in page
    # one notice, in words (no Markdown backticks shown as such), the scene "held-out"
    assert page.count('class="notice"') == 1 and "`" not in page
    assert f"held-out toy scene {scene.index}" in page and "heldout" not in page
    assert f"Image: held-out toy scene {scene.index}" in printed
    # exactly one box per object, with the object's shape, on the object
    detections = record["detections"]
    assert sorted(d["label"] for d in detections) == sorted(o.shape for o in scene.objects)
    for obj in scene.objects:
        assert any(
            d["label"] == obj.shape and _iou(d["box"], obj.box) >= 0.5 for d in detections
        ), obj
    # the printed count is the number listed
    assert f"{len(detections)} detections (score >= 0.5)\n" in printed
    listed = [line for line in printed.splitlines() if line.startswith("  ") and "[" in line]
    assert len(listed) == len(detections)
    # GA: every word's class map uses the query of the object it refers to, and says so
    words = json.loads((out / "explanation" / "explanation.json").read_text())
    assert words["queries"] == list(cli.TOY_DEMO_QUERIES)
    channels = {r["target"]: (r["class_query"], r["class_query_rule"]) for r in words["results"]}
    for obj in scene.objects:  # "yellow triangle", "green cross": both words, one channel
        head = f"matching: phrase head '{obj.shape}'"
        assert channels[obj.colour] == channels[obj.shape] == (obj.shape, head), obj
    assert channels["and"][0] == "max"  # no query names it: the maximum, stated
    # every object and colour word's displayed map (as saved beside the pictures) peaks on its
    # object
    from safetensors.numpy import load_file

    from jmllm.joint.toy.localisation import peak_in_box

    arrays = load_file(out / "explanation" / "arrays.safetensors")
    labels = {r["target"].strip(): r["label"] for r in words["results"]}
    for obj in scene.objects:
        for word in (obj.colour, obj.shape):
            shown = arrays[f"{labels[word]}/map"]
            assert shown.shape == (128, 128) and peak_in_box(shown, obj.box), (word, obj.box)
    explanation = (out / "explanation" / "report.html").read_text()
    assert "GA explanation:" in printed
    assert '<a href="explanation/report.html">' in page  # a link, not plain text
    assert words["results"] and explanation.count("class='panel'") == len(words["results"])
    assert "https://" not in explanation and "http://" not in explanation


def test_demo_help_states_the_defaults_the_demo_uses():
    help_text = " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split()
    )
    assert "(default: 0.5)" in help_text and "boxes drawn and listed (default: 10)" in help_text
    assert "(default: circle, square, triangle, cross)" in help_text
    assert "(default: 24)" in help_text


def test_hub_ids_offline_fail_in_one_line_after_one_attempt(cli_env, image_file, tmp_path):
    """The README's real-checkpoint command on a machine that cannot reach the Hub: one line with
    the way out, no retry warnings, no waiting for retries."""
    import socket
    import threading

    # a "Hub" that accepts each connection and hangs up without a word: counted
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    connections: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    weights = cli_env / "tiny" / "alignment.safetensors"
    argv = [sys.executable, "-m", "jmllm.joint.cli", "describe", str(image_file)]
    argv += ["--prompt", "What's in the image?", "--owl", "google/owlvit-base-patch32"]
    argv += ["--mllm", "llava-hf/llava-1.5-7b-hf", "--alignment", str(weights)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.close()
    assert len(connections) == 1  # one attempt: huggingface_hub alone retries 5 times per file
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("jmllm-joint describe: error: google/owlvit-base-patch32: ")
    assert "--tiny" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert "Retry" not in done.stderr


def test_a_photo_given_to_the_toy_j_gets_a_warning(image_file, capsys, caplog):
    """The built-in models know only toy scenes: any other image is answered with a warning."""
    assert cli.main(["describe", str(image_file), "--tiny", "--max-new-tokens", "2"]) == 0
    assert "60 × 40 pixels, not a 128 × 128 toy scene" in caplog.text
    assert "mean nothing" in caplog.text


def test_describe_chat_and_detect(cli_env, image_file, tmp_path, capsys, monkeypatch):
    assert (
        cli.main(
            [
                "describe",
                str(image_file),
                "--tiny",
                "--max-new-tokens",
                "3",
                "--json-out",
                "-",
                "--compare",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {
        "prompt",
        "template",
        "tokenization",
        "preprocessing",
        "dtype",
        "answer",
        "tokens",
        "stock_llava",
    }
    assert record["template"] == "llava-1.5"
    args = ["chat", str(image_file), "--tiny", "-p", "Hi?", "-p", "And?", "--max-new-tokens", "2"]
    assert cli.main([*args, "--out", str(tmp_path / "c"), "-q", "cat"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("USER:") == 2 and (tmp_path / "c" / "report.html").is_file()
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is it?\n\nexit\n"))
    assert cli.main(["chat", str(image_file), "--tiny", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("J:") == 1
    out = tmp_path / "d"
    assert (
        cli.main(
            [
                "detect",
                str(image_file),
                "--tiny",
                "-q",
                "cat",
                "-q",
                "dog",
                "--out",
                str(out),
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    record = json.loads((out / "result.json").read_text())
    assert record["queries"] == ["cat", "dog"] and record["image_size"] == [60, 40]
    assert all(0 <= d["box"][2] <= 60 and 0 <= d["box"][3] <= 40 for d in record["detections"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["describe", "{missing}", "--tiny"], "no such image file"),
        (["describe", "{corrupt}", "--tiny"], "not a readable image"),
        (["describe", "{image}", "--tiny", "-p", "  "], "empty prompt"),
        (["detect", "{image}", "--tiny", "-q", "", "--out", "{tmp}/o"], "-q/--query: empty query"),
        (["detect", "{image}", "--tiny", "--out", "{tmp}/o"], "give at least one object"),
        (["describe", "{image}"], "--alignment: required"),
        (["describe", "{image}", "--tiny", "--alignment", "w.safetensors"], "cannot be combined"),
        (
            [
                "describe",
                "{image}",
                "--alignment",
                "{tmp}/none.safetensors",
                "--owl",
                "{tmp}",
                "--mllm",
                "{tmp}",
            ],
            "none.safetensors: no such alignment weights file or folder",
        ),
        (
            ["describe", "{image}", "--alignment", "{w}", "--owl", "{tmp}", "--mllm", "{tmp}"],
            "cannot load OWL-ViT config",
        ),
        (["detect", "{image}", "--tiny", "-q", "cat", "--out", "{image}"], "is not a folder"),
    ],
)
def test_bad_input_is_one_line_naming_it(cli_env, image_file, tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    values = {
        "w": str(cli_env / "tiny" / "alignment.safetensors"),
        "missing": str(tmp_path / "missing.png"),
        "corrupt": str(tmp_path / "corrupt.png"),
        "image": str(image_file),
        "tmp": str(tmp_path),
    }
    code = cli.main([arg.format(**values) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_mismatched_alignment_via_cli(cli_env, tiny_joint_paths, image_file, tmp_path, capsys):
    from jmllm.align import AlignmentConfig, AlignmentLayer, save_alignment

    wrong = save_alignment(
        AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=32, out_dim=40, num_tokens=36)),
        tmp_path / "w.safetensors",
    )
    argv = [
        "describe",
        str(image_file),
        "--owl",
        str(tiny_joint_paths.owl),
        "--mllm",
        str(tiny_joint_paths.llava),
        "--alignment",
        str(wrong),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "w.safetensors" in err and "output dimension 40 != LLaVA text hidden size 48" in err


def test_installed_console_script_exits_nonzero_without_traceback(image_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JMLLM_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "jmllm.joint.cli", "describe", str(tmp_path / "nope.jpg"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"jmllm-joint describe: error: {tmp_path / 'nope.jpg'}: no such image file"
    )
    assert "Traceback" not in proc.stderr
    assert "loading the built-in" not in proc.stderr  # bad input is refused before loading


def test_plugin_subcommands_are_registered(monkeypatch):
    calls = []

    def register(subparsers, common_args):
        parser = subparsers.add_parser("explain", parents=[common_args])
        parser.set_defaults(func=lambda args: 7)
        other = common_args(subparsers.add_parser("hallucinations"))  # the callable form
        other.set_defaults(func=lambda args: 8)
        calls.append(common_args)

    plugin = types.ModuleType("jmllm.joint.cli.explain")
    plugin.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jmllm.joint.cli.explain", plugin)
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: (
            object() if name == "jmllm.joint.cli.explain" else real_find_spec(name, *a)
        ),
    )
    assert cli.main(["explain", "--tiny"]) == 7
    assert cli.main(["hallucinations", "--tiny", "--device", "cpu"]) == 8
    assert len(calls) == 2


def test_stderr_is_quiet_without_v_and_tells_with_it(tmp_path):
    """Without -v a run on a toy scene prints nothing on stderr (no third-party warnings, no
    model-loading bars); with -v the loading shows."""
    from jmllm.joint.toy.scenes import make_scene

    image = tmp_path / "scene.png"
    make_scene("heldout", 2).image.save(image)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "default",
    }
    argv = [
        sys.executable,
        "-m",
        "jmllm.joint.cli",
        "describe",
        str(image),
        "--tiny",
        "--max-new-tokens",
        "4",
    ]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip()
    assert quiet.stderr == "", quiet.stderr
    loud = subprocess.run([*argv, "-v"], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0
    assert "loading the built-in toy-world models" in loud.stderr  # the notice, logged at INFO
    assert "Loading weights" in loud.stderr  # transformers' bar is back with -v


def test_explain_all_shows_progress_per_token(tmp_path, capsys):
    """``explain`` (every word of the answer) is long work: a bar per answer token on stderr."""
    from jmllm.joint.toy.scenes import make_scene

    image = tmp_path / "scene.png"
    make_scene("heldout", 2).image.save(image)
    argv = ["explain", str(image), "--tiny", "-p", "What's the content of the image?"]
    assert cli.main([*argv, "-q", "square", "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "GA per token" in err and "GA gradient norms" in err
