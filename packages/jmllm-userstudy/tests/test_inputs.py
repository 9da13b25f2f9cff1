"""Hostile and mistaken inputs, one class at a time: every command answers bad input with one
line naming it and exit code 2 (nothing written, no folder left behind); one bad answer file or
submission never stops the others; look-alike participant ids are one person; outputs get
ordinary permissions; an edited example is never overwritten without --force."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from jmllm.userstudy.cli import main
from jmllm.userstudy.conventions import EXIT_PARTIAL, EXIT_USAGE, UsageError
from jmllm.userstudy.report import markdown_report
from jmllm.userstudy.score import score_answers
from jmllm.userstudy.serve import make_server
from jmllm.userstudy.spec import load_spec
from jmllm.userstudy.testing import answers_document, write_answers, write_png_header

DEEP = b"[" * 100_000 + b"]" * 100_000  # about 200 kB


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _bomb_spec(d: Path) -> Path:
    write_png_header(d / "images" / "q1_e2.png", 28_000, 28_000)
    return d / "study.yaml"


def _spec_with(d: Path, text: bytes) -> Path:
    (d / "odd.yaml").write_bytes(text)
    return d / "odd.yaml"


Case = Callable[[Path, Path, Path, Path], list[str]]  # (tmp, spec dir, read-only, file) -> argv
CASES: dict[str, tuple[Case, str]] = {
    # -- output paths -------------------------------------------------------------------------
    "render --out is a file": (
        lambda t, d, ro, f: ["render", str(d / "study.yaml"), "--out", str(f)],
        "exists and is not a folder",
    ),
    "render --out read-only": (
        lambda t, d, ro, f: ["render", str(d / "study.yaml"), "--out", str(ro / "site")],
        "cannot write in",
    ),
    "score --out inside a file": (
        lambda t, d, ro, f: ["score", str(d / "study.yaml"), str(t), "--out", str(f / "r")],
        "is a file, not a folder",
    ),
    "score --out read-only": (
        lambda t, d, ro, f: ["score", str(d / "study.yaml"), str(t), "--out", str(ro)],
        "cannot write in",
    ),
    "score answers folder is a file": (
        lambda t, d, ro, f: ["score", str(d / "study.yaml"), str(f), "--out", str(t / "r")],
        "answers folder not found",
    ),
    "example DIR is a file": (lambda t, d, ro, f: ["example", str(f)], "is not a folder"),
    "example DIR read-only": (lambda t, d, ro, f: ["example", str(ro / "ex")], "cannot write in"),
    "serve --answers is a file": (
        lambda t, d, ro, f: ["serve", str(d / "study.yaml"), "--answers", str(f), "--port", "0"],
        "exists and is not a folder",
    ),
    "serve --answers read-only": (
        lambda t, d, ro, f: ["serve", str(d / "study.yaml"), "--answers", str(ro), "--port", "0"],
        "cannot write in",
    ),
    # -- numbers ------------------------------------------------------------------------------
    "serve --port 70000": (
        lambda t, d, ro, f: [
            "serve",
            str(d / "study.yaml"),
            "--answers",
            str(t / "a"),
            "--port",
            "70000",
        ],
        "--port: must be in [0, 65535], got 70000",
    ),
    "serve --port eighty": (
        lambda t, d, ro, f: [
            "serve",
            str(d / "study.yaml"),
            "--answers",
            str(t / "a"),
            "--port",
            "eighty",
        ],
        "must be an integer",
    ),
    "serve --timeout nan": (
        lambda t, d, ro, f: [
            "serve",
            str(d / "study.yaml"),
            "--answers",
            str(t / "a"),
            "--timeout",
            "nan",
        ],
        "--timeout: must be a finite number",
    ),
    "serve --timeout 0": (
        lambda t, d, ro, f: [
            "serve",
            str(d / "study.yaml"),
            "--answers",
            str(t / "a"),
            "--timeout",
            "0",
        ],
        "--timeout: must be in (0, 3600]",
    ),
    # -- malformed specs ------------------------------------------------------------------------
    "render: a 28000x28000 explanation": (
        lambda t, d, ro, f: ["render", str(_bomb_spec(d)), "--out", str(t / "site")],
        "questions[0].explanations[1]: image too large: 28000x28000",
    ),
    "score: a 28000x28000 explanation": (
        lambda t, d, ro, f: ["score", str(_bomb_spec(d)), str(t), "--out", str(t / "r")],
        "image too large",
    ),
    "serve: a 28000x28000 explanation": (
        lambda t, d, ro, f: ["serve", str(_bomb_spec(d)), "--answers", str(t / "a")],
        "image too large",
    ),
    "spec nested 100000 deep": (
        lambda t, d, ro, f: ["render", str(_spec_with(d, DEEP)), "--out", str(t / "site")],
        "nested too deeply",
    ),
    "spec not UTF-8": (
        lambda t, d, ro, f: [
            "render",
            str(_spec_with(d, b"title: caf\xe9\n")),
            "--out",
            str(t / "site"),
        ],
        "cannot read spec file",
    ),
    "spec questions is text": (
        lambda t, d, ro, f: [
            "render",
            str(_spec_with(d, b"seed: 1\nquestions: str\n")),
            "--out",
            str(t / "site"),
        ],
        "questions: missing or empty",
    ),
}


@pytest.fixture
def plain_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    tmp_path: Path,
    example_dir: Path,
    read_only_dir: Path,
    plain_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    build, needle = CASES[case]
    argv = build(tmp_path, example_dir, read_only_dir, plain_file)
    before = set(tmp_path.rglob("*"))
    code, err = run_cli(argv, capsys)
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jmllm-userstudy"), err
    assert needle in lines[0], err
    assert set(tmp_path.rglob("*")) == before  # nothing written, no folder left behind


# -- answer files -----------------------------------------------------------------------------


def test_a_deeply_nested_answer_file_is_set_aside_and_the_rest_scored(
    example_spec, tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    answers = tmp_path / "answers"
    write_answers(example_spec, answers, "p1", correct={"q1", "q2"})
    write_answers(example_spec, answers, "p2", correct={"q3"})
    (answers / "deep.json").write_bytes(DEEP)
    doc = answers_document(example_spec, "p3", correct=set())
    doc["extra"] = json.loads("[" * 40 + "]" * 40)  # deeper than an answers file can be
    (answers / "deeper.json").write_text(json.dumps(doc))
    result = score_answers(example_spec, answers)
    assert [(p.participant_id, p.rate.correct) for p in result.participants] == [
        ("p1", 2),
        ("p2", 1),
    ]
    assert {(p.file, p.kind) for p in result.problems} == {
        ("deep.json", "unreadable"),
        ("deeper.json", "unreadable"),
    }
    # the command scores the rest and says the result is partial
    spec_file = str(example_spec.path)
    code, _ = run_cli(["score", spec_file, str(answers), "--out", str(tmp_path / "r")], capsys)
    assert code == EXIT_PARTIAL
    assert (tmp_path / "r" / "results.md").is_file()


LOOK_ALIKES = ["P01", "P01 ", " p01", "\uff30\uff10\uff11", "P\u200b01", "\ufeffP01", "P\u00ad01"]


def test_look_alike_participant_ids_are_one_person(example_spec, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same answers under look-alike ids are one participant scored once; different answers
    under look-alike ids are a conflict, never two participants. (Each file is as the
    questionnaire of its time would write it: seeded by the id as recorded.)"""
    answers = tmp_path / "answers"
    for i, pid in enumerate(LOOK_ALIKES):
        write_answers(example_spec, answers, pid, correct={"q1"}, file_name=f"same-{i}.json")
    result = score_answers(example_spec, answers)
    assert [(p.participant_id, p.rate.correct) for p in result.participants] == [("p01", 1)]
    assert sorted(p.kind for p in result.problems) == ["duplicate"] * (len(LOOK_ALIKES) - 1)
    assert {p.participant_id for p in result.problems} == {"p01"}

    write_answers(example_spec, answers, "\uff50\uff10\uff11", correct={"q2"}, file_name="z.json")
    result = score_answers(example_spec, answers)
    assert result.participants == ()
    assert {p.kind for p in result.problems} == {"conflicting-duplicate"}


def test_reports_show_ids_and_names_escaped_once(example_dir, spec_editor, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = load_spec(spec_editor(example_dir, '["person", "boat"]', '["it\'s a \\"boat\\"", "x"]'))
    answers = tmp_path / "answers"
    write_answers(spec, answers, "O'Brien", correct={"q3"})
    text = markdown_report(score_answers(spec, answers))
    assert "&#x27;" not in text and "&quot;" not in text and "&\\#" not in text
    assert 'it\'s a "boat"' in text and "o'brien" in text


# -- the collection server --------------------------------------------------------------------


@pytest.fixture
def served(example_spec, tmp_path):  # type: ignore[no-untyped-def]
    server = make_server(example_spec, tmp_path / "answers", port=0, timeout=1.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield host, port, tmp_path / "answers"
    server.shutdown()
    server.server_close()


def post(host: str, port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://{host}:{port}/submit", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_answers_every_submission_and_stores_each_once(served, example_spec) -> None:  # type: ignore[no-untyped-def]
    host, port, answers = served
    assert post(host, port, DEEP)[0] == 400  # a reply, not a dropped connection
    assert post(host, port, b"\xff\xfe")[0] == 400
    doc = answers_document(example_spec, "p01", correct={"q1"})
    status, first = post(host, port, json.dumps(doc).encode())
    assert status == 201
    # the same answers again (a double click, a retry): stored once
    status, again = post(host, port, json.dumps(doc, indent=1).encode())
    assert status == 200 and again == {"stored": first["stored"], "duplicate": True}
    assert [p.name for p in answers.iterdir()] == [first["stored"]]
    # the server is still serving
    assert post(host, port, b"{}")[0] == 400


def test_server_drops_a_silent_client_after_its_timeout(served) -> None:  # type: ignore[no-untyped-def]
    host, port, _ = served
    with socket.create_connection((host, port), timeout=10) as silent:
        silent.sendall(b"POST /submit HTTP/1.1\r\nContent-Type: application/json\r\n")
        start = time.monotonic()
        assert silent.recv(1024) == b""  # closed by the server, not by us
        assert time.monotonic() - start < 8


def test_server_refuses_an_unwritable_answers_folder(example_spec, read_only_dir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="cannot write in"):
        make_server(example_spec, read_only_dir, port=0)


# -- outputs ----------------------------------------------------------------------------------


def test_example_never_overwrites_an_edited_spec_without_force(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["example", str(tmp_path / "s"), "--placeholders"]) == 0
    spec = tmp_path / "s" / "study.yaml"
    spec.write_text(spec.read_text().replace("seed: 2024", "seed: 7"))  # the researcher's edit
    code, err = run_cli(["example", str(tmp_path / "s")], capsys)  # refused before any model
    assert code == EXIT_USAGE and "already exists" in err and "--force" in err
    assert "seed: 7" in spec.read_text()
    assert main(["example", str(tmp_path / "s"), "--force", "--placeholders"]) == 0
    assert "seed: 2024" in spec.read_text()


def test_force_never_replaces_a_study_the_example_did_not_write(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--force replaces an earlier example, never the researcher's own study.yaml or images/."""
    own = tmp_path / "mine"
    own.mkdir()
    (own / "study.yaml").write_text("title: my study\n")
    code, err = run_cli(["example", str(own), "--force", "--placeholders"], capsys)
    assert code == EXIT_USAGE and "study.yaml was not written by jmllm-userstudy example" in err
    assert (own / "study.yaml").read_text() == "title: my study\n"
    assert sorted(p.name for p in own.iterdir()) == ["study.yaml"]


def test_render_and_score_claim_their_out_folder(example_spec, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("my home page")
    render = ["render", str(example_spec.path), "--out", str(site)]
    code, err = run_cli(render, capsys)
    assert code == EXIT_USAGE and "holds 1 entry jmllm-userstudy render did not write" in err
    assert main([*render, "--force"]) == 0  # beside it, untouched
    assert (site / "index.html").read_text() == "my home page"
    assert (site / "questionnaire.html").is_file()
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "results.md").write_text("my notes")
    write_answers(example_spec, tmp_path / "in", "p1", correct={"q1"})
    score = ["score", str(example_spec.path), str(tmp_path / "in"), "--out", str(tmp_path / "res")]
    code, err = run_cli([*score, "--force"], capsys)
    assert code == EXIT_USAGE and "results.md was not written by jmllm-userstudy score" in err
    assert (tmp_path / "res" / "results.md").read_text() == "my notes"


def test_outputs_have_ordinary_permissions(example_spec, tmp_path, served) -> None:  # type: ignore[no-untyped-def]
    host, port, _ = served
    old = os.umask(0o002)
    try:
        assert main(["example", str(tmp_path / "ex"), "--placeholders"]) == 0
        assert main(["render", str(tmp_path / "ex" / "study.yaml"), "--out", str(tmp_path / "site")]) == 0  # fmt: skip
        write_answers(example_spec, tmp_path / "in", "p1", correct={"q1"})
        assert main(["score", str(example_spec.path), str(tmp_path / "in"), "--out", str(tmp_path / "res")]) == 0  # fmt: skip
        assert post(host, port, json.dumps(answers_document(example_spec, "p9", set())).encode())[0] == 201  # fmt: skip
    finally:
        os.umask(old)
    files = [
        p
        for folder in ("ex", "site", "res", "answers")
        for p in (tmp_path / folder).rglob("*")
        if p.is_file()
    ]
    assert len(files) >= 16 + 1 + 3 + 1
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    shutil.rmtree(tmp_path / "ex")


def test_explanation_hook_applies_the_image_policy_and_refuses_titles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from jmllm.userstudy.conventions import ImageLoadError
    from jmllm.userstudy.from_joint import joint_explainer, write_explanations

    bomb = write_png_header(tmp_path / "q.png", 28_000, 28_000)
    with pytest.raises(ImageLoadError, match="image too large: 28000x28000"):
        write_explanations(bomb, ("cat", "dog"), tmp_path / "maps", lambda im, name: im)
    assert not (tmp_path / "maps").exists()
    pytest.importorskip("jmllm.joint")
    with pytest.raises(ValueError, match="no title"):
        joint_explainer(title="GA: cat")
