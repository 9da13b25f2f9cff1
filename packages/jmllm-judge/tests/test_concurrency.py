"""Two runs on one cache never send a judgement twice, whatever happens to either of them; a
judgement's ``attempts`` counts the requests of every run, killed ones included.

The runs are real ``jmllm-judge run`` processes; the local fake judge counts every request it
receives, per judgement, so "sent twice" and the true number of attempts are measured, not
assumed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from jmllm.judge.cache import STALE_AFTER_S, JudgeCache
from jmllm.judge.captions import save_captions
from jmllm.judge.manifest import Manifest
from jmllm.judge.testing import default_sigint

KEY = "sk-test-concurrency"


def answered_in(cache_path: Path) -> int:
    """Answered rows, read as another process would (the runs may be writing)."""
    try:
        with sqlite3.connect(f"file:{cache_path}?mode=ro", uri=True, timeout=5) as db:
            query = "SELECT COUNT(*) FROM judgements WHERE status = 'answered'"
            return int(db.execute(query).fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for(condition, timeout_s: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


class Run:
    """A ``jmllm-judge run`` subprocess whose stderr lines are collected as they come."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "JUDGE_TEST_KEY": KEY}
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,  # Ctrl-C reaches it even when the tests run in a background job (SIGINT ignored there)
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.stderr.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} on stderr: {''.join(self.stderr)}")

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str]:
        stdout, _ = self.process.communicate(timeout=timeout_s)
        self._reader.join(timeout=5)
        while not self.lines.empty():
            self.stderr.append(self.lines.get())
        return self.process.returncode, stdout


def command(
    manifest_path: Path,
    captions: list[Path],
    server,
    cache: Path,
    out: Path,
    concurrency: str = "16",
) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        sys.executable, "-m", "jmllm.judge.cli", "run",
        "--manifest", str(manifest_path), "--captions", *map(str, captions),
        "--model", "fake-judge", "--base-url", server.base_url, "--api-key-env", "JUDGE_TEST_KEY",
        "--cache", str(cache), "--timeout", "60", "--concurrency", concurrency, "-o", str(out),
    ]  # fmt: skip


def setup(manifest: Manifest, make_captions, tmp_path: Path) -> tuple[Path, list[Path]]:  # type: ignore[no-untyped-def]
    manifest_path = manifest.save(tmp_path / "manifest.json")
    captions = [
        save_captions(tmp_path / f"{name}.jsonl", make_captions(manifest, name), manifest)
        for name in ("A", "B")
    ]
    return manifest_path, captions


def assert_attempts_are_what_the_server_received(results_path: Path, server) -> None:  # type: ignore[no-untyped-def]
    received = Counter(s.caption for s in server.served)
    records = json.loads(results_path.read_text())["records"]
    assert records and all(r["status"] == "answered" for r in records)
    assert {r["caption"]: r["attempts"] for r in records} == {
        r["caption"]: received[r["caption"]] for r in records
    }


def test_second_run_waits_then_takes_over_a_killed_runs_judgements(
    manifest: Manifest, make_captions, judge_server, tmp_path: Path
) -> None:
    """Run 1 gets 6 answers, then its other 10 requests hang; run 2 starts on the same cache and
    waits for them instead of sending them; run 1 is killed (-9), leaving its claims behind; run 2
    takes them over at once and finishes. Every judgement is answered exactly once, no request is
    sent for a judgement already answered, and the recorded attempts are exactly the requests the
    server received (2 for the 10 that run 1 had in flight)."""
    manifest_path, captions = setup(manifest, make_captions, tmp_path)
    n = 2 * len(manifest)
    server = judge_server(latency_s=0.01, answer_limit=6)
    cache = tmp_path / "shared.sqlite"
    first = Run(command(manifest_path, captions, server, cache, tmp_path / "r1.json"))
    try:
        # every answer the server gave has reached the cache, every other request hangs
        wait_for(
            lambda: (
                (answered_in(cache) == 6 and server.outcomes()["hung"] == n - 6)
                or first.process.poll() is not None
            )
        )
        assert first.process.poll() is None, first.finish()
        second = Run(command(manifest_path, captions, server, cache, tmp_path / "r2.json"))
        try:
            second.wait_for_line("being sent by another run on this cache")
            time.sleep(1.0)  # it keeps waiting while run 1 lives
            assert len(server.served) == n and server.outcomes()["answered"] == 6
            first.process.send_signal(signal.SIGKILL)
            first.finish()
            server.release()  # run 1's hung requests are dropped; new ones are answered
            code, stdout = second.finish()
        finally:
            second.process.kill()
    finally:
        first.process.kill()
    assert code == 0, "".join(second.stderr)
    assert f"{n - 6} requests needed sending" in stdout
    assert server.requests_after_answer() == []
    answered = server.answered()
    assert len(answered) == n and set(answered.values()) == {1}
    assert sorted(Counter(s.caption for s in server.served).values()) == [1] * 6 + [2] * (n - 6)
    assert_attempts_are_what_the_server_received(tmp_path / "r2.json", server)


def test_two_runs_started_together_pay_each_judgement_once(
    manifest: Manifest, make_captions, judge_server, tmp_path: Path
) -> None:
    """Two runs started at the same moment on a new cache, both finishing: the server receives
    each judgement once, and both results files hold every judgement with the same replies."""
    manifest_path, captions = setup(manifest, make_captions, tmp_path)
    n = 2 * len(manifest)
    server = judge_server(latency_s=0.3)
    cache = tmp_path / "shared.sqlite"
    runs = [  # 2 in flight: about 2.4 s of judging, so the runs overlap
        Run(command(manifest_path, captions, server, cache, tmp_path / f"r{i}.json", "2"))
        for i in (1, 2)
    ]
    try:
        finished = [run.finish() for run in runs]
    finally:
        for run in runs:
            run.process.kill()
    assert [code for code, _ in finished] == [0, 0], [run.stderr for run in runs]
    assert len(server.served) == n and set(server.received().values()) == {1}
    sent = [int(out.split(" requests needed sending")[0].rsplit(" ", 1)[1]) for _, out in finished]
    assert sum(sent) == n
    replies = [
        {(r["system"], r["image_id"]): r["reply"] for r in json.loads(p.read_text())["records"]}
        for p in (tmp_path / "r1.json", tmp_path / "r2.json")
    ]
    assert replies[0] == replies[1] and len(replies[0]) == n


def test_ctrl_c_keeps_attempt_counts_for_the_next_run(
    manifest: Manifest, make_captions, judge_server, tmp_path: Path
) -> None:
    """After Ctrl-C and a rerun, attempts count both runs' requests (before: only the last)."""
    manifest_path, captions = setup(manifest, make_captions, tmp_path)
    n = 2 * len(manifest)
    server = judge_server(latency_s=0.01, answer_limit=5)
    cache = tmp_path / "cache.sqlite"
    cmd = command(manifest_path, captions, server, cache, tmp_path / "r.json")
    first = Run(cmd)
    try:
        wait_for(
            lambda: (
                (answered_in(cache) == 5 and server.outcomes()["hung"] == n - 5)
                or first.process.poll() is not None
            )
        )
        first.process.send_signal(signal.SIGINT)
        code, _ = first.finish()
    finally:
        first.process.kill()
    assert code == 130
    server.release()
    second = Run(cmd)
    try:
        code, _ = second.finish()
    finally:
        second.process.kill()
    assert code == 0, second.stderr
    assert server.requests_after_answer() == []
    assert_attempts_are_what_the_server_received(tmp_path / "r.json", server)
    assert max(r["attempts"] for r in json.loads((tmp_path / "r.json").read_text())["records"]) == 2


def test_claims_of_live_dead_and_silent_runs(tmp_path: Path) -> None:
    """The claim rules on their own: a live run's claim is busy; a released claim, a dead
    process's claim (same host) and a claim silent for STALE_AFTER_S are taken over, keeping
    their attempt counts; a judgement another run failed after we started is not sent again."""
    path = tmp_path / "c.sqlite"
    with JudgeCache(path) as a, JudgeCache(path) as b:
        since = time.time()
        assert a.claim(["k1", "k2", "k3", "k4"], since=since).claimed == ["k1", "k2", "k3", "k4"]
        for key in ("k1", "k2", "k3"):
            a.count_attempt(key)
        claims = b.claim(["k1", "k2"], since=since)
        assert (claims.claimed, claims.busy) == ([], ["k1", "k2"])  # a is alive (same pid)
        db = a._db
        # k1: a process that is gone; k2: another host, silent too long; k3: released
        db.execute("UPDATE claims SET pid = 2147483646 WHERE key = 'k1'")
        db.execute(
            "UPDATE claims SET host = 'elsewhere', heartbeat = ? WHERE key = 'k2'",
            (time.time() - STALE_AFTER_S - 1,),
        )
        a.put_failure("k4", model="m", request={}, error="boom", attempts=1)
        db.execute("UPDATE claims SET owner = NULL WHERE key = 'k3'")
        claims = b.claim(["k1", "k2", "k3", "k4"], since=since)
        assert claims.claimed == ["k1", "k2", "k3"] and claims.done == ["k4"]
        b.count_attempt("k1")
        b.put_answer("k1", model="m", request={}, reply="7", attempts=1)
        assert b.get("k1").attempts == 2  # one by the dead run, one by b
        b.release()
        assert a.claim(["k2"], since=time.time()).claimed == ["k2"]  # released by b: free
