"""``--base-url``: a query string works (sent with every request, Azure's ``api-version`` style)
and its values, like the key, never reach a log line, an error message or a file, even at -vv;
credentials in the URL are refused without being repeated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jmllm.judge.captions import save_captions
from jmllm.judge.manifest import Manifest

KEY = "sk-proj-KEY-0123456789abcdef"
QUERY_SECRET = "sig-QUERY-9876543210fedcba"


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JUDGE_KEY": KEY}
    return subprocess.run(
        [sys.executable, "-m", "jmllm.judge.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def run_args(tmp_path: Path, manifest: Manifest, make_captions) -> list[str]:  # type: ignore[no-untyped-def]
    manifest_path = manifest.save(tmp_path / "manifest.json")
    captions = save_captions(tmp_path / "a.jsonl", make_captions(manifest, "A"), manifest)
    return [
        "run", "--manifest", str(manifest_path), "--captions", str(captions),
        "--model", "fake-judge", "--api-key-env", "JUDGE_KEY", "--timeout", "5",
        "--max-attempts", "2", "-o", str(tmp_path / "out" / "results.json"),
    ]  # fmt: skip


def all_output_files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_query_string_is_sent_and_never_shown(
    run_args: list[str], judge_server, tmp_path: Path, manifest: Manifest
) -> None:
    server = judge_server(api_key=KEY, echo_authorization=True)
    url = f"{server.base_url}?api-version=2024-06-01&sig={QUERY_SECRET}"
    done = run(["-vv", *run_args, "--base-url", url])
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(server.served) == len(manifest)
    assert all(s.query == {"api-version": "2024-06-01", "sig": QUERY_SECRET} for s in server.served)
    assert "HTTP Request" in done.stderr  # -vv did log the requests ...
    for secret in (KEY, QUERY_SECRET):  # ... without the secrets
        assert secret not in done.stdout + done.stderr
        assert secret.encode() not in all_output_files(tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["base_url"] == server.base_url  # recorded without the query


def test_errors_from_a_judge_that_refuses_do_not_show_secrets(
    run_args: list[str], judge_server
) -> None:  # type: ignore[no-untyped-def]
    """A 401 from a server that echoes what it received: the one-line error names the URL
    without its query, and no secret."""
    server = judge_server(api_key="another-key", echo_authorization=True)
    done = run(["-vv", *run_args, "--base-url", f"{server.base_url}?sig={QUERY_SECRET}"])
    assert done.returncode == 2
    assert "refused the request" in done.stderr and server.base_url in done.stderr
    assert KEY not in done.stderr and QUERY_SECRET not in done.stderr
    assert "[REDACTED]" in done.stderr  # the echoed key was there, redacted


@pytest.mark.parametrize(
    "url",
    [
        f"http://judge:{QUERY_SECRET}@127.0.0.1:9/v1",
        f"http://{QUERY_SECRET}@127.0.0.1:9/v1",
        f"https://:{QUERY_SECRET}@example.org/v1?x=1",
    ],
)
def test_credentials_in_the_url_are_refused_unrepeated(run_args: list[str], url: str) -> None:
    done = run(["-vv", *run_args, "--base-url", url])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "jmllm-judge run: error: --base-url contains credentials (user:password@ before the "
        "host); they would be sent instead of the API key and could reach logs, so they are "
        "refused: put the key in the environment variable named by --api-key-env (the URL is "
        "not repeated here)"
    ]
    assert QUERY_SECRET not in done.stdout + done.stderr


def test_a_judge_url_where_nothing_listens_fails_fast_naming_it(run_args: list[str]) -> None:
    """A refused connection before the server ever answered is a wrong --base-url: one line
    naming the URL, exit 2, no retries (not attempts × back-off of waiting)."""
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        args = [a if a != "2" else "8" for a in run_args]  # --max-attempts 8: would retry ~minutes
        start = time.monotonic()
        done = run([*args, "--base-url", url])
        elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "cannot connect" in lines[0], done.stderr
    assert "retry" not in done.stderr
    assert elapsed < 30  # python start-up included; the retry policy alone would take longer


def test_unreachable_is_told_from_a_dropped_connection() -> None:
    import httpx
    import openai

    from jmllm.judge.client import _unreachable

    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    for cause in (httpx.ConnectError("refused"), ConnectionRefusedError()):
        try:
            raise openai.APIConnectionError(request=request) from cause
        except openai.APIConnectionError as e:
            assert _unreachable(e)
    try:
        raise openai.APIConnectionError(request=request) from httpx.RemoteProtocolError("reset")
    except openai.APIConnectionError as e:
        assert not _unreachable(e)
