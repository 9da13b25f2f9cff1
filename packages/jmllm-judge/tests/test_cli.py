"""The four commands end to end, as a new user runs them, against the local fake judge."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest

from jmllm.judge.cli import main
from jmllm.judge.prompts import judge_user_prompt
from jmllm.judge.testing import caption_of, default_answer

SECRET = "sk-proj-SECRET-0123456789abcdef-never-written"
NASTY = '<img src=x onerror="alert(1)"> | it\'s a "dog"\nunder a <b>table</b> & {chair} `x` $y$'


def theirs_jsonl(path: Path, manifest_path: Path, name: str, nasty_first: bool = False) -> Path:
    """A JSONL as another system would write it: COCO ids and an "answer" field."""
    manifest = json.loads(manifest_path.read_text())
    rows = []
    for i, image in enumerate(manifest["images"]):
        text = NASTY if nasty_first and i == 0 else f"{name} sees image {image['image_id']}"
        if nasty_first and i in (1, 2):
            text += (" [bad-format]", " [out-of-range]")[i - 1]
        rows.append({"image_id": int(image["image_id"]), "answer": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer(user_text: str) -> str:
    caption = caption_of(user_text)
    if caption.endswith("[bad-format]"):
        return "Score: 8"  # not a bare number: invalid
    if caption.endswith("[out-of-range]"):
        return "11"  # out of range: invalid
    return default_answer(user_text)


def test_coco_to_table1_one_command_per_step(
    tmp_path: Path,
    coco_file: Path,
    images_dir: Path,
    judge_server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything any library logs, HTTP debug included
    # Every first request of a judgement gets the next of: a reply, 429, 500, a dropped
    # connection, a reply slower than the timeout.
    first_tries = itertools.cycle([None, "429", "500", "drop", "slow"])
    server = judge_server(
        latency_s=0.01,
        fault_plan=lambda served: next(first_tries) if served.attempt == 1 else None,
        retry_after_ms=20,
        slow_s=3.0,
        answer=answer,
    )
    server.config.api_key = SECRET
    server.config.echo_authorization = True  # a hostile server echoing the key back in errors
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    run = tmp_path / "run"

    def cli(*args: str) -> int:
        return main(["-vv", *args])

    assert cli("sample", "--coco", str(coco_file), "--images", str(images_dir), "-n", "10", "--seed", "1", "-o", str(run / "manifest.json")) == 0  # fmt: skip
    manifest_path = run / "manifest.json"
    assert cli("captions", "--manifest", str(manifest_path), "--system", "COCO GT", "--ground-truth", "-o", str(run / "gt.jsonl")) == 0  # fmt: skip
    llava_out = theirs_jsonl(tmp_path / "llava-out.jsonl", manifest_path, "LLaVA", nasty_first=True)
    j_out = theirs_jsonl(tmp_path / "j-out.jsonl", manifest_path, "J")
    assert cli("captions", "--manifest", str(manifest_path), "--system", "LLaVA", "--from-jsonl", str(llava_out), "--caption-field", "answer", "-o", str(run / "llava.jsonl")) == 0  # fmt: skip
    assert cli("captions", "--manifest", str(manifest_path), "--system", "J", "--from-jsonl", str(j_out), "--caption-field", "answer", "-o", str(run / "j.jsonl")) == 0  # fmt: skip
    run_args = [
        "run", "--manifest", str(manifest_path),
        "--captions", str(run / "gt.jsonl"), str(run / "llava.jsonl"), str(run / "j.jsonl"),
        "--model", "fake-judge", "--base-url", server.base_url, "--api-key-env", "MY_JUDGE_KEY",
        "--timeout", "2", "-o", str(run / "results.json"),
    ]  # fmt: skip
    assert cli(*run_args) == 0
    assert cli("report", str(run / "results.json"), "-o", str(run / "report")) == 0

    # Every judgement done despite the faults, each answered exactly once.
    assert set(server.answered().values()) == {1} and len(server.answered()) == 30
    assert server.requests_after_answer() == []
    assert {"429", "500", "drop", "slow"} <= set(server.outcomes())
    assert all(s.authorization == f"Bearer {SECRET}" for s in server.served)  # the key was used

    # The nasty caption reached the judge intact, inside the verbatim prompt.
    nasty = [s for s in server.served if s.caption == NASTY]
    assert nasty and all(s.user_text == judge_user_prompt(NASTY) for s in nasty)
    authors = f'From 1 to 10, score this caption for the image: "{NASTY}". Only answer with a number from 1 to 10.'
    assert nasty[0].user_text == authors  # the authors' form by default, verbatim

    # Table 1: replies read as the authors' script did (int(reply)), invalid ones counted and
    # excluded; "11" is a score for int() and listed as a disagreement with the strict reader.
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["score_parser"] == "authors"
    llava = next(s for s in report["systems"] if s["system"] == "LLaVA")
    assert (llava["valid"], llava["invalid"], llava["failed"]) == (9, 1, 0)
    assert sorted(r["reply"] for r in report["invalid"]) == ["Score: 8"]
    assert [r["reply"] for r in report["reader_disagreements"]] == ["11"]
    results = json.loads((run / "results.json").read_text())
    replies = [r["reply"] for r in results["records"] if r["system"] == "LLaVA"]
    valid = [int(r) for r in replies if r.strip().lstrip("+-").isdigit()]
    assert llava["mean"] == pytest.approx(sum(valid) / len(valid))
    assert cli("report", str(run / "results.json"), "--score-parser", "strict", "-o", str(run / "strict")) == 0  # fmt: skip
    strict = json.loads((run / "strict" / "report.json").read_text())
    llava_strict = next(s for s in strict["systems"] if s["system"] == "LLaVA")
    assert (llava_strict["valid"], llava_strict["invalid"]) == (8, 2)
    markdown = (run / "report" / "report.md").read_text()
    assert "| Model: | COCO GT | LLaVA | J |" in markdown
    assert "<img" not in markdown and "<b>" not in markdown
    assert (run / "report" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "llava.jsonl").read_text().splitlines()[0])["caption"] == NASTY

    # The key is nowhere: cache (and its WAL), manifest, captions, results, report, output, logs.
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert SECRET not in caplog.text
    assert "[REDACTED]" in caplog.text or "[REDACTED]" in (run / "results.json").read_text()

    # A second run sends nothing and gives the same results.
    before = len(server.served)
    assert cli(*run_args) == 0
    assert len(server.served) == before


def test_errors_are_one_line_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    assert main(["captions", "--manifest", str(tmp_path / "nope.json"), "--system", "S", "--ground-truth", "-o", str(tmp_path / "x")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert (
        err.startswith("jmllm-judge captions: error: cannot read manifest")
        and "Traceback" not in err
    )

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    (tmp_path / "m.json").write_text(
        json.dumps({"format": "jmllm-judge/manifest", "version": 1, "images": []})
    )
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"system": "S", "image_id": "1", "caption": "c"}) + "\n"
    )
    code = main(["run", "--manifest", str(tmp_path / "m.json"), "--captions", str(tmp_path / "c.jsonl"), "--model", "m", "--api-key-env", "NO_SUCH_KEY_VAR", "-o", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 2 and "NO_SUCH_KEY_VAR holds no API key" in capsys.readouterr().err


def test_failed_judgements_give_exit_code_3_and_are_reported(
    tmp_path: Path, manifest, make_captions, judge_server, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    from jmllm.judge.captions import save_captions

    server = judge_server(fault_plan=lambda served: "500")
    monkeypatch.setenv("K", "k")
    manifest_path = manifest.save(tmp_path / "m.json")
    save_captions(tmp_path / "a.jsonl", make_captions(manifest, "A"), manifest)
    args = ["run", "--manifest", str(manifest_path), "--captions", str(tmp_path / "a.jsonl"), "--model", "m", "--base-url", server.base_url, "--api-key-env", "K", "--max-attempts", "2", "-o", str(tmp_path / "r.json")]  # fmt: skip
    assert main(args) == 3
    assert main(["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["systems"][0]["failed"] == len(manifest) and report["systems"][0]["mean"] is None
    assert all(r["score"] is None and r["reply"] is None for r in report["failed"])
    assert "A: — (0 valid, 0 invalid, 8 failed)" in capsys.readouterr().out


def test_judge_prompt_by_name_is_sent_and_reported(
    tmp_path: Path, manifest, make_captions, judge_server, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from jmllm.judge.captions import save_captions

    server = judge_server()
    monkeypatch.setenv("K", "k")
    manifest_path = manifest.save(tmp_path / "m.json")
    captions = make_captions(manifest, "A")
    save_captions(tmp_path / "a.jsonl", captions, manifest)
    base = ["run", "--manifest", str(manifest_path), "--captions", str(tmp_path / "a.jsonl"), "--model", "m", "--base-url", server.base_url, "--api-key-env", "K"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "authors.json")]) == 0
    sent = len(server.served)
    assert main([*base, "--judge-prompt", "supplementary", "-o", str(tmp_path / "supp.json")]) == 0
    # another prompt is another judgement: every image is judged again, with the bare caption
    supplementary = server.served[sent:]
    assert len(supplementary) == len(manifest)
    tail = ". Only answer with a number from 1 to 10."
    head = "From 1 to 10, score this caption for the image: "
    texts = captions.captions.values()
    assert {s.user_text for s in server.served[:sent]} == {f'{head}"{c}"{tail}' for c in texts}
    assert {s.user_text for s in supplementary} == {f"{head}{c}{tail}" for c in texts}
    for name, words in (("authors", "authors' script"), ("supp", "supplementary §1.1")):
        assert main(["report", str(tmp_path / f"{name}.json"), "-o", str(tmp_path / name)]) == 0
        assert words in (tmp_path / name / "report.md").read_text()
