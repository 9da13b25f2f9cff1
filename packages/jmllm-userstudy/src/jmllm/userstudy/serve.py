"""A small local collection server (standard library only).

``GET /`` serves the questionnaire rendered from the spec; ``POST /submit`` stores one answer
document (JSON, at most 1 MB, for this spec's fingerprint) as a new file in the answers folder.
The questionnaire shows its "Send answers" button only when it is loaded over http(s), so the
same page still works from a file with the download button alone. Submissions are not judged
here: ``jmllm-userstudy score`` checks order, completeness and duplicates later.

- A submission is read exactly as scoring reads an answer file
  (:func:`~jmllm.userstudy.score.read_answers_document`): whatever its content (a 200 kB
  nesting of brackets included), the reply is a 4xx status, never a dropped connection.
- The same document sent twice (a double click, a retry after a lost reply) is stored once; the
  second reply names the file already stored.
- Each stored submission is logged with the participant id (its normal form) and the file name,
  nothing else of the answers.
- A client has :data:`DEFAULT_TIMEOUT_S` seconds (``timeout``) for each read: a connection that
  sends nothing is closed instead of holding a thread.
- The answers folder is checked writable at start; the server refuses to start otherwise.

Meant for a lab machine or a trusted network: it has no authentication and no TLS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .conventions import UsageError, check_output_dir
from .participants import normalise_participant_id, problem_with_participant_id
from .render import render_questionnaire
from .score import MAX_ANSWERS_BYTES, read_answers_document
from .spec import StudySpec

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_SUBMISSION_BYTES", "make_server"]

log = logging.getLogger(__name__)
MAX_SUBMISSION_BYTES = MAX_ANSWERS_BYTES
DEFAULT_TIMEOUT_S = 30.0  # seconds a client has for each read of its request


def _content_key(doc: dict[str, Any]) -> str:
    """Identity of a submission's content (key order and whitespace do not matter)."""
    canonical = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_writable(folder: Path) -> None:
    """Refuse an answers folder the server could not store a submission in (checked by writing
    and removing a file, which also catches root on a read-only file system)."""
    check_output_dir(folder, "--answers")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"--answers {folder}: cannot store submissions there ({exc.strerror or exc})"
        ) from None


def _stored_submissions(folder: Path) -> dict[str, str]:
    """Content key -> file name of the submissions already in ``folder`` (a restarted server
    still recognises a document it stored before)."""
    stored: dict[str, str] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            doc = read_answers_document(path.read_bytes())
        except OSError:
            continue
        if isinstance(doc, dict):
            stored.setdefault(_content_key(doc), path.name)
    return stored


def make_server(
    spec: StudySpec,
    answers_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> ThreadingHTTPServer:
    """A server for ``spec`` that stores submissions in ``answers_dir``; call ``serve_forever()``.

    Args:
        spec: The validated study spec (rendered once, at start).
        answers_dir: Folder for the submitted answer files (created if missing).
        host: Interface to bind; the default only accepts connections from this machine.
        port: TCP port; 0 picks a free one (read it back from ``server.server_address``).
        timeout: Seconds a client has for each read of its request before it is disconnected.

    Returns:
        A bound, not yet serving, :class:`~http.server.ThreadingHTTPServer`.

    Raises:
        UsageError: the answers folder cannot be written, or ``timeout`` is not a positive
            finite number.

    >>> import tempfile
    >>> from jmllm.userstudy.example import write_example
    >>> from jmllm.userstudy.spec import load_spec
    >>> root = tempfile.mkdtemp()
    >>> server = make_server(load_spec(write_example(root)), f"{root}/answers", port=0)
    >>> server.server_address[0]
    '127.0.0.1'
    >>> server.server_close()
    """
    from .conventions import check_finite

    seconds = check_finite(timeout, "timeout", 0.0, open_low=True)
    folder = Path(answers_dir)
    _check_writable(folder)
    page = render_questionnaire(spec).encode("utf-8")
    fingerprint = spec.fingerprint()
    stored = _stored_submissions(folder)
    lock = threading.Lock()  # one submission decided and stored at a time

    class Handler(BaseHTTPRequestHandler):
        server_version = "jmllm-userstudy"
        sys_version = ""
        # socketserver applies it to the connection: every read, headers and body, is bounded
        timeout = seconds

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            self._reply(status, json.dumps(payload).encode("utf-8"), "application/json")

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] in ("/", "/questionnaire.html"):
                self._reply(HTTPStatus.OK, page, "text/html; charset=utf-8")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/submit":
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            # A JSON content type forces a CORS preflight, so other sites cannot post here.
            if self.headers.get_content_type() != "application/json":
                self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return
            if not 0 < length <= MAX_SUBMISSION_BYTES:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "submission too large"})
                return
            try:
                body = self.rfile.read(length)
            except OSError:  # the client went silent past the timeout, or disconnected
                self.close_connection = True
                return
            doc = read_answers_document(body)
            if isinstance(doc, tuple):
                kind, detail = doc
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"{kind}: {detail}"})
                return
            if doc.get("spec_fingerprint") != fingerprint:
                self._json(HTTPStatus.CONFLICT, {"error": "answers are for another spec"})
                return
            raw_pid = doc.get("participant_id")
            why = problem_with_participant_id(raw_pid)
            if why is not None:
                self._json(HTTPStatus.BAD_REQUEST, {"error": why})
                return
            pid = normalise_participant_id(str(raw_pid))
            key = _content_key(doc)
            with lock:
                if key in stored:
                    log.info(
                        "participant %r sent the same answers again; kept %s", pid, stored[key]
                    )
                    self._json(HTTPStatus.OK, {"stored": stored[key], "duplicate": True})
                    return
                safe = re.sub(r"[^A-Za-z0-9_-]", "_", pid)[:40]
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                name = f"{stamp}-{safe or 'anonymous'}-{secrets.token_hex(4)}.json"
                text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
                try:
                    atomic_write_text(folder / name, text)
                except OSError as exc:
                    log.error("cannot store a submission of participant %r: %s", pid, exc)
                    self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "cannot store"})
                    return
                stored[key] = name
            log.info("stored the answers of participant %r as %s", pid, name)
            self._json(HTTPStatus.CREATED, {"stored": name})

    return ThreadingHTTPServer((host, port), Handler)
