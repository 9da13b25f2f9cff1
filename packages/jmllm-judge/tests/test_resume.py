"""Interrupted runs resume from the cache and never pay twice for a judgement.

The fake judge answers a fixed number of requests and then holds every further request without a
reply, so when the run is killed every answer the server gave has reached the cache: any request for
an already-answered key after the restart would be a judgement paid twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jmllm.judge.cache import JudgeCache
from jmllm.judge.captions import save_captions
from jmllm.judge.manifest import Manifest
from jmllm.judge.runner import judge_all
from jmllm.judge.testing import default_sigint

KEY = "sk-test-resume"


def answered_in(cache_path: Path) -> int:
    """Answered rows, read the way another process would (the run may be writing)."""
    if not cache_path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True, timeout=5) as db:
            return int(
                db.execute("SELECT COUNT(*) FROM judgements WHERE status = 'answered'").fetchone()[
                    0
                ]
            )
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for(condition, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def assert_each_judgement_answered_once(server, n: int) -> None:  # type: ignore[no-untyped-def]
    assert server.requests_after_answer() == []
    answered = server.answered()
    assert len(answered) == n and set(answered.values()) == {1}


def test_cancelled_run_resumes_without_resending(
    manifest: Manifest, make_captions, judge_server, fast_settings, tmp_path: Path
) -> None:
    server = judge_server(latency_s=0.01, answer_limit=5)
    systems = [make_captions(manifest, "A"), make_captions(manifest, "B")]
    settings = fast_settings(server, timeout_s=30.0)
    cache_path = tmp_path / "cache.sqlite"

    async def interrupted() -> None:
        with JudgeCache(cache_path) as cache:
            task = asyncio.ensure_future(judge_all(manifest, systems, settings, cache, api_key=KEY))
            while cache.counts().get("answered", 0) < 5:
                await asyncio.sleep(0.01)
            task.cancel()  # what Ctrl-C does inside asyncio.run
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(interrupted())
    assert server.outcomes()["answered"] == 5 and server.outcomes()["hung"] > 0
    server.release()

    with JudgeCache(cache_path) as cache:
        results = asyncio.run(judge_all(manifest, systems, settings, cache, api_key=KEY))
    assert results.complete and results.sent == 2 * len(manifest) - 5
    assert_each_judgement_answered_once(server, 2 * len(manifest))

    before = len(server.served)
    with JudgeCache(cache_path) as cache:  # a third run has nothing to send
        again = asyncio.run(judge_all(manifest, systems, settings, cache, api_key=KEY))
    assert again.sent == 0 and len(server.served) == before
    assert [r.reply for r in again.records] == [r.reply for r in results.records]


def _cli_run(manifest_path: Path, captions: list[Path], server, tmp_path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        sys.executable, "-m", "jmllm.judge.cli", "-v", "run",
        "--manifest", str(manifest_path),
        "--captions", *map(str, captions),
        "--model", "fake-judge",
        "--base-url", server.base_url,
        "--api-key-env", "JUDGE_TEST_KEY",
        "--cache", str(tmp_path / "cache.sqlite"),
        "--timeout", "30",
        "-o", str(tmp_path / "results.json"),
    ]  # fmt: skip


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_cli_run_stopped_midway_resumes_without_resending(
    stop: signal.Signals, manifest: Manifest, make_captions, judge_server, tmp_path: Path
) -> None:
    manifest_path = manifest.save(tmp_path / "manifest.json")
    captions = [
        save_captions(tmp_path / f"{name}.jsonl", make_captions(manifest, name), manifest)
        for name in ("A", "B")
    ]
    server = judge_server(latency_s=0.01, answer_limit=6)
    command = _cli_run(manifest_path, captions, server, tmp_path)
    env = {**os.environ, "JUDGE_TEST_KEY": KEY}

    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,  # Ctrl-C reaches it even when the tests run in a background job (SIGINT ignored there)
    )
    try:
        wait_for(lambda: answered_in(tmp_path / "cache.sqlite") == 6 or process.poll() is not None)
        assert process.poll() is None, process.communicate()
        # every other request has reached the server and hangs there: a request still on its
        # way when the run dies would be answered to nobody (paid) and sent again, a judgement
        # paid twice that no client could avoid (it failed about 1 run in 3)
        wait_for(lambda: server.outcomes()["hung"] == 2 * len(manifest) - 6)
        process.send_signal(stop)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    if stop == signal.SIGINT:
        assert process.returncode == 130, stderr
        assert "interrupted: 6 judgements are safe" in stderr
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    assert server.outcomes()["answered"] == 6
    server.release()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{2 * len(manifest) - 6} requests needed sending" in rerun.stdout
    assert_each_judgement_answered_once(server, 2 * len(manifest))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["counts"]["answered"] == 2 * len(manifest) and results["counts"]["failed"] == 0
