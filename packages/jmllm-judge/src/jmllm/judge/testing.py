"""A real, local, misbehaving judge server for tests, demos and benchmarks.

:class:`FakeJudgeServer` serves enough of ``POST /v1/chat/completions`` on 127.0.0.1 for the official
``openai`` client (stdlib ``http.server``, one thread per connection, HTTP/1.1 keep-alive), and
injects the faults a hosted judge shows: latency, 429 with ``Retry-After``, 500, dropped
connections, replies slower than the client's timeout, and answers that are not a score. It counts
every request per *request key* (a hash of the model and the messages, so the same judgement always
has the same key) and records in order what it did with each, which lets a test prove that no
judgement was ever answered twice.

>>> with FakeJudgeServer(FakeJudgeConfig(latency_s=0.05, fault_rate=0.1)) as server:  # doctest: +SKIP
...     client = AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)

Also runnable by hand: ``python -m jmllm.judge.testing --latency-ms 50 --fault-rate 0.1 --port 8000``
then ``jmllm-judge run --base-url http://127.0.0.1:8000/v1 ...``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from jmllm.judge.conventions import atomic_write_bytes

__all__ = [
    "FAULT_KINDS",
    "FakeJudgeConfig",
    "FakeJudgeProcess",
    "FakeJudgeServer",
    "ServedRequest",
    "caption_of",
    "default_answer",
    "default_sigint",
    "make_test_images",
    "request_key",
    "write_coco_captions",
    "write_png_header",
]

# The transient faults, drawn at random with `fault_rate`: "429": rate limited with Retry-After;
# "500": server error; "drop": connection closed without a reply; "slow": a 200 that arrives only
# after `slow_s` (past the client's timeout). A `fault_plan` may also answer "400": a request the
# server rejects for good.
FAULT_KINDS = ("429", "500", "drop", "slow")

_PROMPT_HEAD = "score this caption for the image: "
_PROMPT_TAIL = ". Only answer with a number from 1 to 10."


def caption_of(user_text: str) -> str:
    """The caption inside a judge user prompt (the text between its fixed head and tail), in
    either form: the authors' (caption in double quotes) or the supplementary's (bare)."""
    start = user_text.find(_PROMPT_HEAD)
    end = user_text.rfind(_PROMPT_TAIL)
    if start < 0 or end < start:
        return user_text
    inner = user_text[start + len(_PROMPT_HEAD) : end]
    if len(inner) >= 2 and inner.startswith('"') and inner.endswith('"'):
        return inner[1:-1]
    return inner


def default_sigint() -> None:
    """``preexec_fn`` of a CLI a test stops with Ctrl-C: SIGINT's default action in the child,
    so Python installs its KeyboardInterrupt handler (a process started from a background job
    inherits SIGINT ignored and would never stop).

    Example:
        >>> subprocess.Popen(command, preexec_fn=default_sigint)  # doctest: +SKIP
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def default_answer(user_text: str) -> str:
    """A deterministic score from 1 to 10 for a caption (so reruns agree)."""
    digest = hashlib.sha256(caption_of(user_text).encode("utf-8")).digest()
    return str(1 + digest[0] % 10)


def request_key(body: dict[str, Any]) -> str:
    """What identifies a judgement on the wire: the model and the messages."""
    ident = json.dumps(
        [body.get("model"), body.get("messages")], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


@dataclass
class FakeJudgeConfig:
    """How the fake judge behaves. Faults are decided per (request key, attempt number), seeded, so
    two servers with the same config inject the same faults into the same workload."""

    latency_s: float = 0.0  # added before every reply (and before every fault)
    fault_rate: float = 0.0  # probability that an attempt gets a fault instead of a reply
    fault_kinds: tuple[str, ...] = FAULT_KINDS  # chosen uniformly among these
    seed: int = 0
    # Overrides fault_rate: fault_plan(request) -> a kind from FAULT_KINDS, or None to answer.
    fault_plan: Callable[[ServedRequest], str | None] | None = None
    retry_after_s: int = 1  # the Retry-After header of a 429 (HTTP allows whole seconds)
    retry_after_ms: float | None = None  # also send OpenAI's retry-after-ms header when set
    slow_s: float = 3.0  # how late a "slow" reply is
    # The reply text for a user prompt; default_answer gives a valid score.
    answer: Callable[[str], str] = default_answer
    usage: bool = True  # include token usage in replies
    api_key: str | None = None  # when set, any other bearer token gets a 401
    # A hostile server: echo the Authorization header it received in every error message.
    echo_authorization: bool = False
    # After this many answers, further requests hang (no reply) until release() or close().
    answer_limit: int | None = None
    # Compress every reply body ("gzip" or "deflate") and say so in Content-Encoding.
    content_encoding: str | None = None


@dataclass
class ServedRequest:
    """What the server did with one request, in arrival order."""

    key: str
    attempt: int  # 1 for the first request with this key
    outcome: str  # "answered", "unauthorized", "bad-request", "hung" or a fault kind
    body: dict[str, Any] = field(repr=False)
    authorization: str | None = field(repr=False)
    at_s: float  # time.monotonic() when the request arrived
    query: dict[str, str] = field(default_factory=dict, repr=False)  # the URL's query parameters

    @property
    def user_text(self) -> str:
        """The text of the user message (the judge prompt with the caption)."""
        content = next(m for m in self.body["messages"] if m.get("role") == "user")["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        return "".join(p.get("text", "") for p in parts if p.get("type") == "text")

    @property
    def caption(self) -> str:
        return caption_of(self.user_text)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access logs
        pass

    def do_POST(self) -> None:
        self.server.owner._handle(self)

    def do_GET(self) -> None:
        self.server.owner._send_json(self, 404, {"error": {"message": "not found"}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: with more concurrent clients the kernel drops
    # connection attempts and the client retries them a second later, which a real judge server
    # never does. A backlog as large as a production server's keeps the fake from throttling.
    request_queue_size = 1024
    owner: FakeJudgeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up: normal here
            return
        super().handle_error(request, client_address)


class FakeJudgeServer:
    """The fake judge on ``127.0.0.1:<port>`` (port 0: any free port). Start with :meth:`start` or a
    ``with`` block; ``base_url`` is what the openai client needs."""

    def __init__(self, config: FakeJudgeConfig | None = None, *, port: int = 0) -> None:
        self.config = config or FakeJudgeConfig()
        self._port = port
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._attempts: Counter[str] = Counter()
        self._in_flight = 0
        self.max_in_flight = 0  # the most requests the server was handling at once
        self.served: list[ServedRequest] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FakeJudgeServer:
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-judge",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def release(self) -> None:
        """Let hung requests go (they are closed without a reply) and lift ``answer_limit``."""
        with self._lock:
            self.config.answer_limit = None
        self._release.set()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- statistics ----------------------------------------------------------------------------
    def received(self) -> Counter[str]:
        """Requests received per request key."""
        with self._lock:
            return Counter(r.key for r in self.served)

    def answered(self) -> Counter[str]:
        """Valid 200 replies per request key (a late "slow" reply is not counted here)."""
        with self._lock:
            return Counter(r.key for r in self.served if r.outcome == "answered")

    def outcomes(self) -> Counter[str]:
        with self._lock:
            return Counter(r.outcome for r in self.served)

    def requests_after_answer(self) -> list[ServedRequest]:
        """Requests for a key that had already been answered: each one is a judgement paid twice."""
        seen: set[str] = set()
        twice = []
        with self._lock:
            for r in self.served:
                if r.key in seen:
                    twice.append(r)
                if r.outcome == "answered":
                    seen.add(r.key)
        return twice

    # -- request handling ----------------------------------------------------------------------
    def _fault(self, served: ServedRequest) -> str | None:
        cfg = self.config
        key, attempt = served.key, served.attempt
        if cfg.fault_plan is not None:
            return cfg.fault_plan(served)
        if cfg.fault_rate <= 0 or not cfg.fault_kinds:
            return None
        digest = hashlib.sha256(f"{cfg.seed}:{key}:{attempt}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw >= cfg.fault_rate:
            return None
        return cfg.fault_kinds[digest[8] % len(cfg.fault_kinds)]

    def _record(self, key: str, body: dict[str, Any], authorization: str | None) -> ServedRequest:
        with self._lock:
            self._attempts[key] += 1
            served = ServedRequest(
                key, self._attempts[key], "pending", body, authorization, time.monotonic()
            )
            self.served.append(served)
            return served

    def _set_outcome(self, served: ServedRequest, outcome: str) -> None:
        with self._lock:
            served.outcome = outcome

    def _send_json(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        if self.config.content_encoding == "gzip":
            data = gzip.compress(data, compresslevel=9)
        elif self.config.content_encoding == "deflate":
            data = zlib.compress(data, 9)
        if self.config.content_encoding:
            handler.send_header("Content-Encoding", self.config.content_encoding)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            handler.wfile.write(data)
            handler.wfile.flush()
        except OSError:  # the client gave up (timeout) and closed the connection
            handler.close_connection = True

    def _error(self, message: str, authorization: str | None) -> dict[str, Any]:
        if self.config.echo_authorization:
            message += f" (you sent Authorization: {authorization})"
        return {"error": {"message": message, "type": "fake_judge_error"}}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self._respond(handler)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        cfg = self.config
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        authorization = handler.headers.get("Authorization")
        try:
            body = json.loads(raw)
            user_text = ServedRequest("", 0, "", body, None, 0.0).user_text
            if not isinstance(body["model"], str):
                raise TypeError("model")
        except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
            self._send_json(
                handler, 400, self._error("malformed chat completion request", authorization)
            )
            return
        route, _, query = handler.path.partition("?")
        if route.rstrip("/") != "/v1/chat/completions":
            self._send_json(handler, 404, self._error(f"no route {route}", authorization))
            return
        key = request_key(body)
        served = self._record(key, body, authorization)
        served.query = dict(parse_qsl(query, keep_blank_values=True))
        if cfg.api_key is not None and authorization != f"Bearer {cfg.api_key}":
            self._set_outcome(served, "unauthorized")
            self._send_json(handler, 401, self._error("invalid api key", authorization))
            return

        fault = self._fault(served)
        hang = False
        if fault is None:
            # Decided on arrival, under the lock, before the latency: a request that arrived while
            # the limit held is held too, even if release() comes during its latency. Otherwise
            # a request the client has already given up on could be answered after release() and
            # look like a judgement paid twice.
            with self._lock:
                limit = cfg.answer_limit
                hang = (
                    limit is not None and sum(r.outcome == "answered" for r in self.served) >= limit
                )
                served.outcome = "hung" if hang else "answered"
        else:
            self._set_outcome(served, fault)
        if cfg.latency_s:
            time.sleep(cfg.latency_s)
        if hang:
            self._release.wait()
            fault = "drop"

        if fault == "429":
            headers = {"Retry-After": str(cfg.retry_after_s)}
            if cfg.retry_after_ms is not None:
                headers["retry-after-ms"] = str(cfg.retry_after_ms)
            self._send_json(handler, 429, self._error("rate limited", authorization), headers)
        elif fault == "400":
            self._send_json(handler, 400, self._error("image too large", authorization))
        elif fault == "500":
            self._send_json(handler, 500, self._error("internal error", authorization))
        elif fault == "drop":
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            if fault == "slow":
                time.sleep(cfg.slow_s)
            reply = cfg.answer(user_text)
            self._send_json(handler, 200, self._completion(body, reply, len(raw)))

    def _completion(self, body: dict[str, Any], reply: str, request_bytes: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{len(self.served)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }
        if self.config.usage:
            prompt_tokens = max(1, request_bytes // 4)  # a plausible count, not a tokenizer
            completion_tokens = max(1, len(reply) // 4)
            payload["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
        return payload


class FakeJudgeProcess:
    """The fake judge in a process of its own, as a real judge is: its request handling does not
    compete with the client for the interpreter lock. The config must be picklable (the default
    ``answer`` and no ``fault_plan``, or module-level functions).

    >>> with FakeJudgeProcess(FakeJudgeConfig(latency_s=0.05)) as server:  # doctest: +SKIP
    ...     run_against(server.base_url); print(server.outcomes())
    """

    def __init__(self, config: FakeJudgeConfig | None = None) -> None:
        self.config = config or FakeJudgeConfig()
        self.port = 0

    def __enter__(self) -> FakeJudgeProcess:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no inherited threads or locks
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_in_child, args=(self.config, child), daemon=True
        )
        self._process.start()
        self.port = int(self._conn.recv())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def outcomes(self) -> Counter[str]:
        self._conn.send("outcomes")
        return Counter(self._conn.recv())

    def answered(self) -> Counter[str]:
        self._conn.send("answered")
        return Counter(self._conn.recv())


def _serve_in_child(config: FakeJudgeConfig, conn: Any) -> None:
    with FakeJudgeServer(config) as server:
        conn.send(server.port)
        while (request := conn.recv()) != "stop":
            conn.send(dict(server.outcomes() if request == "outcomes" else server.answered()))


def make_test_images(folder: str | os.PathLike[str], n: int) -> list[Path]:
    """``n`` small, distinct images in several formats and modes (JPEG RGB, PNG RGBA, PNG L, and
    BMP, a format the API does not take and the client converts)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        color = (37 * i % 256, 255 - 11 * i % 256, 101 * i % 256)
        kind = i % 4
        if kind == 0:
            path, image = folder / f"{i:012d}.jpg", Image.new("RGB", (32, 24), color)
        elif kind == 1:
            path, image = folder / f"{i:012d}.png", Image.new("RGBA", (16, 16), (*color, 128))
        elif kind == 2:
            path, image = folder / f"{i:012d}.png", Image.new("L", (20, 12), color[0])
        else:
            path, image = folder / f"{i:012d}.bmp", Image.new("RGB", (10, 10), color)
        image.putpixel((0, 0), (i % 256,) * len(image.getbands()))  # distinct bytes for every i
        buffer = io.BytesIO()
        image.save(buffer, format={".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix])
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def write_coco_captions(
    path: str | os.PathLike[str], image_paths: list[Path], per_image: int = 3
) -> Path:
    """A ``captions_train2017.json``-format file for ``image_paths`` (ids from 1000), with
    ``per_image`` captions each (surrounding whitespace included, as in COCO)."""
    images, annotations = [], []
    for i, p in enumerate(image_paths):
        image_id = 1000 + i
        images.append(
            {
                "id": image_id,
                "file_name": p.name,
                "coco_url": f"http://images.cocodataset.org/train2017/{p.name}",
                "height": 24,
                "width": 32,
            }
        )
        for k in range(per_image):
            annotations.append(
                {
                    "id": 10 * image_id + k,
                    "image_id": image_id,
                    "caption": f" Image {i}, caption {k}. ",
                }
            )
    text = json.dumps({"info": {}, "images": images, "annotations": annotations})
    return atomic_write_bytes(Path(path), text.encode("utf-8"))


def write_png_header(path: str | os.PathLike[str], width: int, height: int) -> Path:
    """A PNG file of a few hundred bytes whose header claims ``width`` x ``height`` pixels: a
    decompression bomb for any reader that trusts the header (the pixel data is a stub).

    >>> import tempfile
    >>> from PIL import Image
    >>> bomb = write_png_header(Path(tempfile.mkdtemp()) / "bomb.png", 28_000, 28_000)
    >>> bomb.stat().st_size < 1000
    True
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    data += chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    return atomic_write_bytes(Path(path), data)


def main(argv: list[str] | None = None) -> None:
    """Serve the fake judge until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m jmllm.judge.testing", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = FakeJudgeConfig(
        latency_s=args.latency_ms / 1000, fault_rate=args.fault_rate, seed=args.seed
    )
    with FakeJudgeServer(config, port=args.port) as server:
        print(f"fake judge at {server.base_url} (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
