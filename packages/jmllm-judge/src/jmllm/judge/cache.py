"""Step 3b: the judgement cache — every request and reply, in SQLite, so nothing is paid for twice.

One row per judgement, keyed by :func:`jmllm.judge.client.judgement_key` (a hash of the judge model,
both prompts with the caption, the image's content hash or URL, and the sampling parameters). The
database runs in WAL mode and commits each row as it arrives, so a crash or Ctrl-C loses at most the
requests that were in flight; a rerun sends only the keys that have no answer.

A row is either

* ``answered``: the judge replied; ``reply`` holds the raw text (a valid score or not — the score is
  read from it by :func:`jmllm.judge.parsing.parse_score` whenever it is needed, never stored), or
* ``failed``: no reply after every retry; ``error`` says why and ``reply`` is NULL, so a failure can
  never be read as a score. A failed key is sent again by the next run.

An answered row is never overwritten. The API key is never passed to this module.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jmllm.judge.errors import JudgeError
from jmllm.judge.parsing import parse_score

__all__ = ["CachedJudgement", "JudgeCache"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS judgements (
    key               TEXT PRIMARY KEY,
    status            TEXT NOT NULL CHECK (status IN ('answered', 'failed')),
    reply             TEXT,
    error             TEXT,
    attempts          INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    model             TEXT NOT NULL,
    request           TEXT NOT NULL,  -- JSON; the image is referenced by hash or URL, not inlined
    response_id       TEXT,
    updated_at        REAL NOT NULL,
    CHECK ((status = 'answered') = (reply IS NOT NULL)),
    CHECK (status = 'failed' OR error IS NULL)
);
"""


@dataclass(frozen=True)
class CachedJudgement:
    """One row of the cache."""

    key: str
    status: str  # "answered" or "failed"
    reply: str | None
    error: str | None
    attempts: int
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str
    request: dict[str, Any]

    @property
    def answered(self) -> bool:
        return self.status == "answered"

    @property
    def score(self) -> int | None:
        """The 1–10 score, or ``None`` for a failure or an invalid reply."""
        return parse_score(self.reply) if self.answered else None


class JudgeCache:
    """SQLite store of judgements. Use as a context manager or call :meth:`close`.

    >>> with JudgeCache("judge.sqlite") as cache:  # doctest: +SKIP
    ...     cache.get_many(keys)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit: every write below is its own transaction, durable once it returns.
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "PRAGMA synchronous=NORMAL"
            )  # WAL + NORMAL: safe against process crashes
            self._db.executescript(_SCHEMA)
            row = self._db.execute(
                "SELECT value FROM meta WHERE name = 'schema_version'"
            ).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise JudgeError(
                    f"cache {self.path}: schema version {row[0]}, expected {SCHEMA_VERSION}"
                )
        except sqlite3.DatabaseError as e:
            raise JudgeError(f"cannot open judge cache {self.path}: {e}") from e

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    _COLUMNS = (
        "key, status, reply, error, attempts, prompt_tokens, completion_tokens, model, request"
    )

    @staticmethod
    def _row(row: tuple[Any, ...]) -> CachedJudgement:
        key, status, reply, error, attempts, prompt_tokens, completion_tokens, model, request = row
        return CachedJudgement(
            key,
            status,
            reply,
            error,
            attempts,
            prompt_tokens,
            completion_tokens,
            model,
            json.loads(request),
        )

    def get(self, key: str) -> CachedJudgement | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM judgements WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else self._row(row)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedJudgement]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CachedJudgement] = {}
        for start in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                f"SELECT {self._COLUMNS} FROM judgements WHERE key IN ({marks})", chunk
            ):
                found[row[0]] = self._row(row)
        return found

    def put_answer(
        self,
        key: str,
        *,
        model: str,
        request: dict[str, Any],
        reply: str,
        attempts: int,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        response_id: str | None = None,
    ) -> None:
        """Store the judge's reply. Replaces a failure; an existing answer is kept as it is."""
        self._db.execute(
            """
            INSERT INTO judgements (key, status, reply, error, attempts, prompt_tokens,
                                    completion_tokens, model, request, response_id, updated_at)
            VALUES (?, 'answered', ?, NULL, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (key) DO UPDATE SET
                status = 'answered', reply = excluded.reply, error = NULL,
                attempts = judgements.attempts + excluded.attempts,
                prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens,
                model = excluded.model, request = excluded.request,
                response_id = excluded.response_id, updated_at = excluded.updated_at
            WHERE judgements.status = 'failed'
            """,
            (key, reply, attempts, prompt_tokens, completion_tokens, model,
             json.dumps(request, ensure_ascii=False, sort_keys=True), response_id, time.time()),
        )  # fmt: skip

    def put_failure(
        self, key: str, *, model: str, request: dict[str, Any], error: str, attempts: int
    ) -> None:
        """Record that ``key`` got no reply. Never replaces an answer."""
        self._db.execute(
            """
            INSERT INTO judgements (key, status, reply, error, attempts, model, request, updated_at)
            VALUES (?, 'failed', NULL, ?, ?, ?, ?, ?)
            ON CONFLICT (key) DO UPDATE SET
                error = excluded.error, attempts = judgements.attempts + excluded.attempts,
                updated_at = excluded.updated_at
            WHERE judgements.status = 'failed'
            """,
            (key, error, attempts, model, json.dumps(request, ensure_ascii=False, sort_keys=True),
             time.time()),
        )  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Number of rows per status."""
        return dict(
            self._db.execute("SELECT status, COUNT(*) FROM judgements GROUP BY status").fetchall()
        )
