"""A small local collection server (standard library only).

``GET /`` serves the questionnaire rendered from the spec; ``POST /submit`` stores one answer
document (JSON, at most 1 MB, for this spec's fingerprint) as a new file in the answers folder.
The questionnaire shows its "Send answers" button only when it is loaded over http(s), so the
same page still works from a file with the download button alone. Submissions are not judged
here: ``jmllm-userstudy score`` checks order, completeness and duplicates later.

Meant for a lab machine or a trusted network: it has no authentication and no TLS.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .render import render_questionnaire
from .score import ANSWERS_FORMAT
from .spec import StudySpec

__all__ = ["MAX_SUBMISSION_BYTES", "make_server"]

log = logging.getLogger(__name__)
MAX_SUBMISSION_BYTES = 1_000_000


def make_server(
    spec: StudySpec, answers_dir: str | Path, host: str = "127.0.0.1", port: int = 8000
) -> ThreadingHTTPServer:
    """A server for ``spec`` that stores submissions in ``answers_dir``; call ``serve_forever()``.

    Args:
        spec: The validated study spec (rendered once, at start).
        answers_dir: Folder for the submitted answer files (created if missing).
        host: Interface to bind; the default only accepts connections from this machine.
        port: TCP port; 0 picks a free one (read it back from ``server.server_address``).

    Returns:
        A bound, not yet serving, :class:`~http.server.ThreadingHTTPServer`.

    >>> import tempfile
    >>> from jmllm.userstudy.example import write_example
    >>> from jmllm.userstudy.spec import load_spec
    >>> root = tempfile.mkdtemp()
    >>> server = make_server(load_spec(write_example(root)), f"{root}/answers", port=0)
    >>> server.server_address[0]
    '127.0.0.1'
    >>> server.server_close()
    """
    page = render_questionnaire(spec).encode("utf-8")
    fingerprint = spec.fingerprint()
    folder = Path(answers_dir)
    folder.mkdir(parents=True, exist_ok=True)

    class Handler(BaseHTTPRequestHandler):
        server_version = "jmllm-userstudy"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            log.info("%s %s", self.address_string(), format % args)

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
                doc = json.loads(self.rfile.read(length).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self._json(HTTPStatus.BAD_REQUEST, {"error": "not valid JSON"})
                return
            if not isinstance(doc, dict) or doc.get("format") != ANSWERS_FORMAT:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "not an answers document"})
                return
            if doc.get("spec_fingerprint") != fingerprint:
                self._json(HTTPStatus.CONFLICT, {"error": "answers are for another spec"})
                return
            pid = doc.get("participant_id")
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", pid if isinstance(pid, str) else "")[:40]
            name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{safe or 'anonymous'}-{secrets.token_hex(4)}.json"
            atomic_write_text(folder / name, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            log.info("stored submission %s", name)
            self._json(HTTPStatus.CREATED, {"stored": name})

    return ThreadingHTTPServer((host, port), Handler)
