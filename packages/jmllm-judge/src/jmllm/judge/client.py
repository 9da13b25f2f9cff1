"""Step 3a: asking the judge — one chat completion per (image, caption), retried until it answers.

The request is the paper's (supplementary §1.1): the system prompt, then one user message with the
user prompt (caption inserted) as text followed by the image — a base64 ``data:`` URL for a local
file, the URL itself for a remote image — at temperature 0. It goes through the official ``openai``
client (``AsyncOpenAI``) to any OpenAI-compatible server (``base_url``: a hosted API, vLLM, Ollama).

The ``openai`` client's own retries are switched off (``max_retries=0``) so that the policy below is
the only one, visible and testable:

* at most ``concurrency`` requests in flight (:class:`RequestSlots`, a semaphore held only while a
  request is on the wire, not while waiting to retry); a retry takes the next free slot before any
  first attempt, so a judgement that met a fault is not also queued behind the rest of the run;
* a hard per-request deadline (``timeout_s``) on top of the client's socket timeouts, so a reply
  that trickles in slowly also times out;
* retried: 408, 409, 429 and 5xx replies, timeouts, connection errors, and replies that are not a
  chat completion; waits are exponential with full jitter, and at least what the server asks for in
  ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date);
* not retried: other 4xx (a failure for that judgement), and 401/403/404, which say that the key,
  the permissions, the URL or the model are wrong — those stop the whole run with
  :class:`JudgeConfigError`;
* replies are capped at ``max_reply_bytes`` (4 MiB by default), counted both as received and
  once decompressed (gzip and deflate are decoded here, under the cap, so a 2 MB body that
  inflates to 2 GB stops at the cap): an oversized reply is a failure of that judgement, not
  retried and never cached.

The API key is read from the environment by the caller and handed to the client only; every string
that leaves this module (errors, replies) passes through :meth:`JudgeClient.redact` first, and the
command line puts the same redaction on every log line (:class:`RedactingFilter`).

``base_url`` may carry a query string (Azure-style ``?api-version=…``): it is split off and sent
with every request as the client's ``default_query``; its values are treated as secrets (never in
messages, logs or results). Credentials in the URL (``https://user:pw@host``) are refused: the
openai client would send them instead of the API key.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import heapq
import importlib
import io
import itertools
import json
import logging
import random
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from jmllm.judge.conventions import (
    ImageLoadError,
    UsageError,
    check_finite,
    check_pixels,
    one_line,
    open_image,
)
from jmllm.judge.errors import JudgeError
from jmllm.judge.manifest import ManifestImage
from jmllm.judge.prompts import JUDGE_SYSTEM_PROMPT, JUDGE_USER_PROMPT_TEMPLATE, judge_user_prompt

__all__ = [
    "JudgeClient",
    "JudgeConfigError",
    "JudgeFailure",
    "JudgeReply",
    "JudgeSettings",
    "RedactingFilter",
    "Redactor",
    "ReplyEncodingRefused",
    "ReplyTooLarge",
    "RequestSlots",
    "RetryPolicy",
    "build_messages",
    "image_data_url",
    "judgement_key",
    "public_base_url",
    "read_api_key",
    "reply_size_hook",
    "request_record",
    "retry_after_s",
    "split_base_url",
    "verified_image_bytes",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_REPLY_BYTES = 4 * 2**20  # a judge's score is a few bytes; JSON and reasoning more
KEY_VERSION = 1  # bump when the request layout changes, so old cache rows are not reused
_SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


class JudgeConfigError(JudgeError):
    """The judge refused the configuration itself (401/403/404): no point in trying other requests."""


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a failed request again."""

    max_attempts: int = 8  # attempts per judgement, the first included
    base_delay_s: float = 0.5  # the first backoff is drawn from [0, base_delay_s]
    max_delay_s: float = 30.0  # cap on the exponential backoff
    max_retry_after_s: float = 300.0  # cap on what a server may ask us to wait

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise JudgeError(f"max_attempts must be an integer, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise JudgeError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("base_delay_s", "max_delay_s", "max_retry_after_s"):
            _finite(getattr(self, name), name, 0.0)

    def delay_s(self, retry: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Wait before retry number ``retry`` (1 = first retry): full jitter over an exponential
        cap, and never less than the server's ``Retry-After``."""
        jitter = rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1)))
        if retry_after_s is None:
            return jitter
        return min(retry_after_s, self.max_retry_after_s) + jitter * 0.1


@dataclass(frozen=True)
class JudgeSettings:
    """Everything about the judge. The fields in :meth:`key_fields` decide the judgement and so the
    cache key; the others only decide how it is obtained."""

    model: str
    base_url: str | None = None  # None: the openai default (api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable, never its value
    temperature: float = 0.0
    max_tokens: int | None = None  # None: not sent (some reasoning models reject it)
    system_prompt: str = JUDGE_SYSTEM_PROMPT
    user_prompt_template: str = JUDGE_USER_PROMPT_TEMPLATE
    concurrency: int = 16
    timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES  # a larger reply fails its judgement

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            raise JudgeError("name the judge model (--model)")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise JudgeError(f"concurrency must be an integer, got {self.concurrency!r}")
        if self.concurrency < 1:
            raise JudgeError(f"concurrency must be at least 1, got {self.concurrency}")
        # NaN compares false with everything, so ranges alone would let it through (and a NaN
        # timeout made every request fail and be retried to the last attempt).
        _finite(self.timeout_s, "timeout", 0.0, MAX_TIMEOUT_S, open_low=True)
        _finite(self.temperature, "temperature", 0.0, MAX_TEMPERATURE)
        if (
            isinstance(self.max_reply_bytes, bool)
            or not isinstance(self.max_reply_bytes, int)
            or self.max_reply_bytes < 1
        ):
            raise JudgeError(
                f"max_reply_bytes must be a positive integer, got {self.max_reply_bytes!r}"
            )
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise JudgeError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        split_base_url(self.base_url)  # refuses credentials and malformed URLs
        judge_user_prompt("", self.user_prompt_template)  # validates the placeholder

    def key_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "system_prompt": self.system_prompt,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def public(self) -> dict[str, Any]:
        """JSON-safe description for results and reports (no secrets: the URL is stripped of any
        credentials and query string, and only the key's variable *name* is kept)."""
        out = asdict(self)
        out["base_url"] = public_base_url(self.base_url)
        return out


MAX_TIMEOUT_S = 86_400.0  # a day: larger values overflow socket timeouts
MAX_TEMPERATURE = 2.0  # the OpenAI API's range is [0, 2]


def _finite(
    value: Any, name: str, low: float, high: float | None = None, *, open_low: bool = False
) -> float:
    try:
        return check_finite(value, name, low, high, open_low=open_low)
    except UsageError as e:
        raise JudgeError(str(e)) from None


def split_base_url(base_url: str | None) -> tuple[str | None, dict[str, str]]:
    """``(API root, query parameters)`` of ``--base-url``: the root goes to the openai client as
    ``base_url``, the parameters as ``default_query`` (sent with every request).

    Raises:
        JudgeError: not an http(s) URL with a host, a fragment, a repeated query parameter, or
            credentials (``user:password@``). The message never repeats the URL, which may hold
            a secret.

    >>> split_base_url("https://example.org/openai/v1?api-version=2024-06-01")
    ('https://example.org/openai/v1', {'api-version': '2024-06-01'})
    """
    if base_url is None:
        return None, {}
    if not isinstance(base_url, str):
        raise JudgeError(f"--base-url must be text, got {type(base_url).__name__}")
    try:
        parts = urlsplit(base_url.strip())
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise JudgeError(
            "--base-url is not a valid URL (not repeated here, as it may hold a secret)"
        ) from None
    if "@" in parts.netloc:
        raise JudgeError(
            "--base-url contains credentials (user:password@ before the host); they would be "
            "sent instead of the API key and could reach logs, so they are refused: put the key "
            "in the environment variable named by --api-key-env (the URL is not repeated here)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JudgeError(
            "--base-url must be an http:// or https:// URL with a host name, e.g. "
            "http://localhost:8000/v1"
        )
    if parts.fragment:
        raise JudgeError("--base-url must not have a #fragment")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise JudgeError(f"--base-url repeats the query parameter(s) {', '.join(repeated)}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), dict(pairs)


class Redactor:
    """Replaces secrets in text: the API key, and the values of ``--base-url``'s query.

    >>> Redactor("sk-123", "http://h/v1?key=abcd").redact("sk-123 and key=abcd")
    '[REDACTED] and key=[REDACTED]'
    """

    MIN_SECRET_CHARS = 4  # shorter query values ("1") are not secrets and would mangle text

    def __init__(self, api_key: str | None, base_url: str | None = None) -> None:
        secrets: list[str] = [api_key] if api_key else []
        try:
            _, query = split_base_url(base_url)
        except JudgeError:
            query = {}
        secrets += [v for v in query.values() if len(v) >= self.MIN_SECRET_CHARS]
        # longest first, so a secret containing another is replaced whole
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[REDACTED]")
        return text

    def __call__(self, text: str) -> str:
        return self.redact(text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record passing a handler (third-party ones included:
    httpx logs request URLs with their query, openai logs response headers).

    >>> import logging
    >>> record = logging.LogRecord("httpx", logging.INFO, "", 0, "GET %s", ("/v1?k=secret",), None)
    >>> RedactingFilter(Redactor(None, "http://h/v1?k=secret")).filter(record), record.getMessage()
    (True, 'GET /v1?k=[REDACTED]')
    """

    def __init__(self, redactor: Callable[[str], str]) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        redacted = self.redactor(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:  # format it here, to redact it
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        return True

    @classmethod
    def install(cls, redactor: Callable[[str], str], handlers: Iterable[logging.Handler]) -> None:
        """Add a filter with ``redactor`` to each of ``handlers``."""
        for handler in handlers:
            handler.addFilter(cls(redactor))


def public_base_url(base_url: str | None) -> str | None:
    """``base_url`` without user info, query or fragment (where credentials sometimes hide)."""
    if base_url is None:
        return None
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def read_api_key(env_name: str, environ: Mapping[str, str]) -> str:
    """The API key from the environment variable ``env_name`` (never from a file or argument)."""
    value = environ.get(env_name, "")
    if not value.strip():
        raise JudgeError(
            f"the environment variable {env_name} holds no API key; set it (servers that need no key, "
            f"such as a local vLLM or Ollama, accept any value: {env_name}=none) or name another "
            "variable with --api-key-env"
        )
    return value.strip()


def judgement_key(settings: JudgeSettings, image: ManifestImage, caption: str) -> str:
    """The cache key: SHA-256 over what determines the judgement — the judge model and sampling
    parameters, the system prompt, the user prompt with the caption in it, and the image's content
    hash (or its URL for a remote image). Not the server URL, the system's name or the key."""
    payload = {
        "v": KEY_VERSION,
        **settings.key_fields(),
        "user_prompt": judge_user_prompt(caption, settings.user_prompt_template),
        "image": {"sha256": image.sha256} if image.path is not None else {"url": image.url},
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verified_image_bytes(image: ManifestImage) -> bytes:
    """A local image's bytes, checked against the manifest's SHA-256 (the hash in the cache key
    must describe what is sent)."""
    assert image.path is not None, "a remote image has no local bytes"
    try:
        data = image.path.read_bytes()
    except OSError as e:
        raise JudgeError(
            f"image {image.image_id}: cannot read {image.path} ({e.strerror or e})"
        ) from e
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise JudgeError(
            f"image {image.image_id}: {image.path} changed since the manifest was written "
            "(its SHA-256 differs); sample again or restore the file"
        )
    return data


def image_data_url(image: ManifestImage) -> str:
    """The image as the judge receives it: the URL of a remote image, or a base64 ``data:`` URL of
    a local file's bytes (converted to PNG only if the format is not one the API accepts)."""
    if image.path is None:
        assert image.url is not None
        return image.url
    data = verified_image_bytes(image)
    try:
        decoded = None
        with _open_checked_image(data, image) as im:
            mime = _SENT_AS_IS.get(im.format or "")
        if mime is None:  # converted: decode under the same pixel limit
            decoded = open_image(data, name=f"image {image.image_id}: {image.path}")
            buffer = io.BytesIO()
            decoded.convert("RGBA" if "A" in decoded.getbands() else "RGB").save(
                buffer, format="PNG"
            )
            data, mime = buffer.getvalue(), "image/png"
    except ImageLoadError as e:
        raise JudgeError(str(e)) from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _open_checked_image(data: bytes, image: ManifestImage) -> Any:
    """The image's header, opened under the pixel limit (nothing decoded)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageLoadError(
                f"image {image.image_id}: {image.path} is not a readable image ({one_line(e)})"
            ) from None
    check_pixels(im.size, f"image {image.image_id}: {image.path}")
    return im


def build_messages(settings: JudgeSettings, image_url: str, caption: str) -> list[dict[str, Any]]:
    """The chat messages of one judgement."""
    return [
        {"role": "system", "content": settings.system_prompt},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": judge_user_prompt(caption, settings.user_prompt_template)},
                {"type": "image_url", "image_url": {"url": image_url}},
            ],
        },
    ]


def request_record(settings: JudgeSettings, image: ManifestImage, caption: str) -> dict[str, Any]:
    """The request as stored in the cache: the real messages with the image replaced by its hash
    or URL (the bytes are in the image file already)."""
    reference = f"sha256:{image.sha256}" if image.path is not None else str(image.url)
    return {
        "model": settings.model,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "image_id": image.image_id,
        "messages": build_messages(settings, reference, caption),
    }


@dataclass(frozen=True)
class JudgeReply:
    """The judge answered (whether the answer is a valid score is the parser's business)."""

    reply: str
    attempts: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    response_id: str | None = None


@dataclass(frozen=True)
class JudgeFailure:
    """No answer after ``attempts`` tries; ``error`` is the last reason."""

    error: str
    attempts: int


class ReplyTooLarge(Exception):
    """The judge's reply is larger than ``max_reply_bytes`` (as received, or once decompressed)."""


class ReplyEncodingRefused(Exception):
    """The judge's reply uses a content encoding this client does not decode under the cap."""


# Content-Encoding → zlib window bits (deflate: zlib-wrapped first, raw deflate as fallback)
_DECODED = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_STREAM_BASES: dict[str, type] = {}


def _capped_stream(response: Any, encodings: list[str], limit: int) -> Any:
    """``response.stream`` replaced by one that decodes ``encodings`` itself and stops at
    ``limit`` bytes, received or decoded. Built on the HTTP library's own ``AsyncByteStream``
    (``httpx`` or ``httpx2``, whichever the ``openai`` client uses)."""
    library = type(response).__module__.split(".")[0]
    base = _STREAM_BASES.get(library)
    if base is None:
        base = importlib.import_module(library).AsyncByteStream
        _STREAM_BASES[library] = base

    class CappedStream(base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        async def __aiter__(self) -> Any:
            stages = [_Inflate(name) for name in reversed(encodings)]  # applied last, undone first
            received = decoded = 0
            async for chunk in self._inner:
                received += len(chunk)
                if received > limit:
                    raise ReplyTooLarge(f"the reply is larger than {limit} bytes")
                for stage in stages:
                    chunk = stage.feed(chunk, limit - decoded)
                decoded += len(chunk)
                if decoded > limit:
                    raise ReplyTooLarge(f"the reply is larger than {limit} bytes once decompressed")
                if chunk:
                    yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    return CappedStream(response.stream)


class _Inflate:
    """One content decoding step whose output never goes past what the cap still allows."""

    def __init__(self, encoding: str) -> None:
        self._name = encoding
        self._inflater = zlib.decompressobj(_DECODED[encoding])
        self._started = False

    def feed(self, data: bytes, room: int) -> bytes:
        try:
            out = self._inflater.decompress(data, max(0, room) + 1)
        except zlib.error:
            if self._name != "deflate" or self._started:
                raise ReplyEncodingRefused(f"the reply is not valid {self._name} data") from None
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some send
            out = self._inflater.decompress(data, max(0, room) + 1)
        self._started = True
        if self._inflater.unconsumed_tail or len(out) > room:
            raise ReplyTooLarge(
                f"the reply is larger than {max(room, 0)} more bytes once decompressed"
            )
        return out


def reply_size_hook(limit: int) -> Callable[[Any], Any]:
    """An HTTP response hook (``event_hooks={"response": [...]}``) that caps every reply body at
    ``limit`` bytes, compressed bodies included: it decodes gzip and deflate itself, under the
    cap, and refuses any other content encoding.

    Example:
        >>> hook = reply_size_hook(4 * 2**20)
        >>> callable(hook)
        True
    """

    async def cap(response: Any) -> None:
        named = response.headers.get("content-encoding", "")
        encodings = [e.strip().lower() for e in named.split(",") if e.strip()]
        encodings = [e for e in encodings if e != "identity"]
        refused = [e for e in encodings if e not in _DECODED]
        if refused:
            await response.aclose()
            raise ReplyEncodingRefused(f"the reply's content encoding {named!r} is not supported")
        response.stream = _capped_stream(response, encodings, limit)
        if encodings:  # decoded by the capped stream: the library must not decode again
            del response.headers["content-encoding"]

    return cap


def _refusal(error: BaseException) -> BaseException | None:
    """A :class:`ReplyTooLarge` or :class:`ReplyEncodingRefused` in ``error``'s cause chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ReplyTooLarge | ReplyEncodingRefused):
            return current
        current = current.__cause__ or current.__context__
    return None


def _unreachable(error: BaseException) -> bool:
    """Whether a connection error means nothing can be reached at the URL: the connection was
    refused or the host name does not resolve (``httpx.ConnectError``, ``ConnectionRefusedError``
    or ``socket.gaierror`` in its cause chain), as opposed to a reset or a dropped connection."""
    import socket

    def connect_error(exc: BaseException) -> bool:  # httpx.ConnectError (openai's transport)
        return any(
            c.__name__ == "ConnectError" and c.__module__.startswith("httpx")
            for c in type(exc).__mro__
        )

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError | socket.gaierror) or connect_error(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an
    HTTP date)."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RequestSlots:
    """A semaphore whose waiters are served by priority (lowest first), then in arrival order."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap
        self._arrivals = itertools.count()

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():  # skip waiters cancelled while queued
                waiter.set_result(None)
                return
        self._free += 1


class JudgeClient:
    """Sends judgements with bounded concurrency, deadlines and retries.

    Args:
        settings: the judge.
        api_key: the key itself (read it with :func:`read_api_key`); kept only inside the client.
        seed: seeds the jitter, for reproducible tests.

    >>> client = JudgeClient(JudgeSettings(model="gpt-4o"), api_key=read_api_key("OPENAI_API_KEY", os.environ))  # doctest: +SKIP
    >>> outcome = await client.judge(lambda: build_messages(settings, image_data_url(image), caption))  # doctest: +SKIP
    """

    def __init__(self, settings: JudgeSettings, *, api_key: str, seed: int | None = None) -> None:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        self.settings = settings
        self._redactor = Redactor(api_key, settings.base_url)
        root, query = split_base_url(settings.base_url)
        self._client = AsyncOpenAI(
            api_key=api_key,
            base_url=root,
            default_query=query or None,
            max_retries=0,  # our retries are the only ones
            timeout=settings.timeout_s,
            # the openai client's own HTTP defaults (limits, redirects, proxies from the
            # environment), with every reply body capped in bytes before it is read
            http_client=DefaultAsyncHttpxClient(
                timeout=settings.timeout_s,
                event_hooks={"response": [reply_size_hook(settings.max_reply_bytes)]},
            ),
        )
        self._slots = RequestSlots(settings.concurrency)
        self._rng = random.Random(seed)
        self._refused: JudgeConfigError | None = None  # once set, nothing more is sent
        self._reached = False  # the server has answered (any HTTP status) at least once

    async def aclose(self) -> None:
        await self._client.close()

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the API key (and of ``base_url``'s query values)
        replaced."""
        return self._redactor.redact(text)

    async def judge(
        self,
        messages: Callable[[], list[dict[str, Any]]],
        *,
        label: str = "",
        on_attempt: Callable[[int], object] | None = None,
    ) -> JudgeReply | JudgeFailure:
        """Send one judgement until it is answered, fails for good, or runs out of attempts.

        Args:
            messages: builds the chat messages; called once per attempt, when a slot is free.
            label: names the judgement in log lines.
            on_attempt: called with the attempt number just before each request is sent (the
                runner counts attempts in the cache with it, so a killed run's count survives).
        """
        policy = self.settings.retry
        error = "not sent"
        for attempt in range(1, policy.max_attempts + 1):
            await self._slots.acquire(priority=-attempt)  # later attempts first
            try:
                if self._refused is not None:
                    raise self._refused
                if on_attempt is not None:
                    on_attempt(attempt)
                outcome = await self._attempt(messages())
            except JudgeConfigError as e:
                self._refused = e
                raise
            finally:
                self._slots.release()
            if isinstance(outcome, JudgeReply):
                return JudgeReply(
                    self.redact(outcome.reply),
                    attempt,
                    outcome.prompt_tokens,
                    outcome.completion_tokens,
                    outcome.response_id,
                )
            error, retryable, retry_after = outcome
            error = self.redact(error)
            if not retryable or attempt == policy.max_attempts:
                break
            wait = policy.delay_s(attempt, retry_after, self._rng)
            log.info(
                "%s: %s; retry %d/%d in %.2f s",
                label,
                error,
                attempt,
                policy.max_attempts - 1,
                wait,
            )
            await asyncio.sleep(wait)
        log.warning("%s: failed after %d attempts: %s", label, attempt, error)
        return JudgeFailure(error=error, attempts=attempt)

    async def _attempt(
        self, messages: list[dict[str, Any]]
    ) -> JudgeReply | tuple[str, bool, float | None]:
        """One request. Returns the reply, or ``(error, retryable, retry_after_s)``."""
        import openai
        from openai.types.chat import ChatCompletion

        settings = self.settings
        body: dict[str, Any] = {
            "model": settings.model,
            "messages": messages,
            "temperature": settings.temperature,
        }
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        try:
            # The client's documented request method with the chat completions route, rather than
            # `chat.completions.create`: the messages are already in wire format, and `create`'s
            # TypedDict transform costs ~3 ms of CPU per request, which against a fast local judge
            # at concurrency 16 is most of the client's time. Same auth, errors and parsing.
            completion = await asyncio.wait_for(
                self._client.post(
                    "/chat/completions",
                    cast_to=ChatCompletion,
                    body=body,
                    options={"timeout": settings.timeout_s},
                ),
                timeout=settings.timeout_s,
            )
        except (ReplyTooLarge, ReplyEncodingRefused) as e:  # the same request, the same reply:
            self._reached = True  # not retried
            return f"reply refused: {e}", False, None
        except (asyncio.TimeoutError, openai.APITimeoutError):
            return f"no reply within {settings.timeout_s:g} s", True, None
        except openai.APIConnectionError as e:
            refused = _refusal(e)  # openai versions that wrap every error of the transport
            if refused is not None:
                self._reached = True
                return f"reply refused: {refused}", False, None
            if not self._reached and _unreachable(e):
                # Nothing listens there (or the name does not resolve), and nothing ever did in
                # this run: a wrong --base-url or a server not started. Retrying only waits.
                raise JudgeConfigError(
                    f"cannot connect to the judge at "
                    f"{public_base_url(settings.base_url) or 'the default OpenAI URL'} "
                    f"({_cause(e)}); check --base-url, or start the server"
                ) from None
            return f"connection error ({_cause(e)})", True, None
        except openai.APIStatusError as e:
            self._reached = True
            status = e.status_code
            message = f"HTTP {status}: {_server_message(e)}"
            if status in (401, 403, 404):
                raise JudgeConfigError(
                    f"the judge at {public_base_url(settings.base_url) or 'the default OpenAI URL'} "
                    f"refused the request ({self.redact(message)}); check the API key variable "
                    f"{settings.api_key_env}, --base-url and --model"
                ) from None
            retryable = status in (408, 409, 429) or status >= 500
            return message, retryable, retry_after_s(e.response.headers) if retryable else None
        except (openai.OpenAIError, ValueError) as e:  # e.g. a 200 that is not a chat completion
            return f"unexpected reply ({type(e).__name__}: {e})", True, None

        self._reached = True
        choices = getattr(completion, "choices", None)
        if not choices:
            return "reply without choices", True, None
        message = choices[0].message
        text = (
            message.content
            if message.content is not None
            else (getattr(message, "refusal", None) or "")
        )
        usage = getattr(completion, "usage", None)
        return JudgeReply(
            reply=str(text),
            attempts=1,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            response_id=getattr(completion, "id", None),
        )


def _cause(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(e)


def _server_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:500]
    return str(getattr(e, "message", e))[:500]
