"""Replies are capped in bytes, compressed bodies included; an oversized reply fails that
judgement (not retried, never cached); a poisoned cache is reported in one line and its readable
rows are kept; the cache never follows a planted link."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from jmllm.judge import cache as cache_module
from jmllm.judge.cache import JudgeCache
from jmllm.judge.client import JudgeSettings
from jmllm.judge.conventions import UsageError
from jmllm.judge.manifest import Manifest
from jmllm.judge.runner import RunResults, judge_all
from jmllm.judge.testing import default_answer

KEY = "sk-test-limits"
LIMIT = 64 * 1024


def judge(manifest, systems, settings: JudgeSettings, cache_path: Path) -> RunResults:  # type: ignore[no-untyped-def]
    with JudgeCache(cache_path) as cache:
        return asyncio.run(judge_all(manifest, systems, settings, cache, api_key=KEY, seed=0))


def _huge_for(caption: str, size: int):  # type: ignore[no-untyped-def]
    def answer(user_text: str) -> str:
        if caption in user_text:
            return "9 " + " " * size  # a valid score, then padding the cap stops
        return default_answer(user_text)

    return answer


@pytest.mark.parametrize(
    ("encoding", "size", "needle"),
    [
        (None, 300_000, f"the reply is larger than {LIMIT} bytes"),
        ("gzip", 20_000_000, "once decompressed"),  # ~20 KB on the wire, 20 MB inflated
        ("deflate", 20_000_000, "once decompressed"),
    ],
)
def test_an_oversized_reply_fails_its_judgement_and_is_never_cached(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path, encoding, size, needle
) -> None:
    one = Manifest(manifest.images[:3], seed=0)
    systems = [make_captions(one, "A")]
    doomed = systems[0].captions[one.images[1].image_id]
    server = judge_server(answer=_huge_for(doomed, size), content_encoding=encoding)
    settings = fast_settings(server, max_reply_bytes=LIMIT)
    results = judge(one, systems, settings, tmp_path / "c.sqlite")
    failed = [r for r in results.records if r.status == "failed"]
    assert [r.caption for r in failed] == [doomed]
    assert failed[0].attempts == 1 and needle in (failed[0].error or ""), failed[0].error
    assert all(r.score is not None for r in results.records if r.status == "answered")
    assert sum(r.status == "answered" for r in results.records) == 2  # the others decoded fine
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        rows = db.execute("SELECT status, reply, length(reply) FROM judgements").fetchall()
    assert sorted(r[0] for r in rows) == ["answered", "answered", "failed"]
    assert max(r[2] or 0 for r in rows) < 100  # nothing large was stored
    server.config.answer = default_answer  # the judge behaves again: only the failure is resent
    before = len(server.served)
    again = judge(one, systems, settings, tmp_path / "c.sqlite")
    assert again.complete and len(server.served) == before + 1


def test_reply_size_setting_is_validated() -> None:
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(UsageError, match="max_reply_bytes"):
            JudgeSettings(model="m", max_reply_bytes=bad)  # type: ignore[arg-type]


def test_a_poisoned_cache_is_reported_once_and_its_readable_rows_kept(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path, caplog, monkeypatch
) -> None:
    """A 300 MB reply stored by an older run (here: over a lowered row limit) and a row that
    does not decode made every later run fail; now they are set aside and judged again."""
    systems = [make_captions(manifest, "A")]
    server = judge_server()
    settings = fast_settings(server)
    path = tmp_path / "c.sqlite"
    first = judge(manifest, systems, settings, path)
    assert first.complete
    keys = [r.key for r in first.records]
    monkeypatch.setattr(cache_module, "MAX_ROW_BYTES", 4000)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE judgements SET reply = ? WHERE key = ?", ("9" + " " * 10_000, keys[0]))
        db.execute("UPDATE judgements SET request = ? WHERE key = ?", ("{not json", keys[1]))
        db.execute("UPDATE judgements SET attempts = 'many' WHERE key = ?", (keys[2],))
    before = len(server.served)
    caplog.set_level(logging.WARNING, logger="jmllm.judge.cache")
    again = judge(manifest, systems, settings, path)
    assert again.complete and all(r.score is not None for r in again.records)
    assert len(server.served) == before + 3  # the three resent; every readable row kept
    warnings = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warnings) == 1 and "3 row(s)" in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("name", ["c.sqlite", "c.sqlite-wal", "c.sqlite-journal"])
def test_the_cache_never_follows_a_planted_link(tmp_path, name) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / name).symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        JudgeCache(tmp_path / "c.sqlite")
    assert victim.read_bytes() == b"precious"


def test_report_claims_its_folder(tmp_path, capsys) -> None:
    """``report -o DIR`` refuses a folder with other files without --force, and never replaces
    a report.md it did not write."""
    from jmllm.judge.cli import main
    from jmllm.judge.runner import RunResults, save_results

    results = save_results(
        tmp_path / "results.json",
        RunResults(settings={"model": "m"}, systems=["A"], records=[], n_images=0),
    )
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["report", str(results), "-o", str(out)]) == 2
    assert "holds 1 entry jmllm-judge report did not write" in capsys.readouterr().err
    assert main(["report", str(results), "-o", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.md").is_file()
    assert main(["report", str(results), "-o", str(out), "--force"]) == 0  # its own: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    assert main(["report", str(results), "-o", str(mine), "--force"]) == 2
    assert "report.md was not written by jmllm-judge report" in capsys.readouterr().err
    assert (mine / "report.md").read_text() == "my report"
