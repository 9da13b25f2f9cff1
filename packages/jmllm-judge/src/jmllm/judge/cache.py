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

**A row that cannot be read is set aside, not fatal.** Rows larger than :data:`MAX_ROW_BYTES`
(the client caps replies at 4 MiB; an older run may have stored a 300 MB reply) are never
loaded, and rows that do not decode (malformed JSON, wrong types) are skipped: both are
reported in one log line, removed from the cache, and their judgements are sent again; every
readable row is kept.

**Several runs on one cache.** Two ``jmllm-judge run`` processes may share a cache (same
machine: WAL mode needs shared memory); they never send the same judgement twice. Before sending,
a run *claims* the keys it will send (:meth:`JudgeCache.claim`, one ``BEGIN IMMEDIATE``
transaction, so two runs cannot both win a key); a key claimed by another live run is waited for
and then read from the cache. A claim belongs to an owner (a random id per open cache, with the
process id and host name) and is dropped in the same transaction that stores the outcome. A run
that stops (Ctrl-C, an error) releases its claims; a run that is killed leaves them behind, and
they count as stale, so another run takes them over, when their process is gone (same host) or
their heartbeat (refreshed every :data:`HEARTBEAT_S` while the run lives) is older than
:data:`STALE_AFTER_S`.

A claim also counts the attempts made for its key (:meth:`JudgeCache.count_attempt`, just before
each request) and keeps that count when released or taken over, so a judgement's ``attempts`` is
the number of requests sent for it by every run, interrupted ones included.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jmllm.judge.conventions import open_nofollow, refuse_link
from jmllm.judge.errors import JudgeError
from jmllm.judge.parsing import parse_score

__all__ = [
    "HEARTBEAT_S",
    "MAX_ROW_BYTES",
    "STALE_AFTER_S",
    "CachedJudgement",
    "Claims",
    "JudgeCache",
]

log = logging.getLogger(__name__)

MAX_ROW_BYTES = 16 * 2**20  # a larger row is never loaded (the client caps replies at 4 MiB)
_ROW_BYTES = (
    "COALESCE(length(CAST(reply AS BLOB)), 0) + COALESCE(length(CAST(error AS BLOB)), 0)"
    " + COALESCE(length(CAST(request AS BLOB)), 0)"
)

SCHEMA_VERSION = 1  # the claims table is an addition older versions ignore
HEARTBEAT_S = 5.0  # a running run refreshes its claims this often
STALE_AFTER_S = 60.0  # a claim not refreshed for this long belongs to a run that is gone

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
CREATE TABLE IF NOT EXISTS claims (
    key        TEXT PRIMARY KEY,
    owner      TEXT,               -- NULL: released, free to claim (the attempts are kept)
    pid        INTEGER,
    host       TEXT,
    heartbeat  REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0  -- requests sent since the last stored outcome
);
"""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, killed but not reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill()


@dataclass
class Claims:
    """What :meth:`JudgeCache.claim` decided for each key."""

    claimed: list[str] = field(default_factory=list)  # ours now: send them
    done: list[str] = field(default_factory=list)  # answered, or failed by another run meanwhile
    busy: list[str] = field(default_factory=list)  # another live run is sending them: wait"""


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
        self.owner = uuid.uuid4().hex  # this open cache's identity in the claims table
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.set_aside = 0  # unreadable rows removed by this open cache (reported once each)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # SQLite follows links at the database and its journals: a planted one is refused
            for suffix in ("-wal", "-shm", "-journal"):
                refuse_link(f"{self.path}{suffix}", "judge cache")
            # SQLite creates new databases 0644 whatever the umask; ours get ordinary permissions
            # (0666 & ~umask) like every other output, and its -wal/-shm files copy them.
            os.close(open_nofollow(self.path, os.O_RDWR | os.O_CREAT, what="judge cache"))
        except OSError as e:
            raise JudgeError(f"cannot open judge cache {self.path}: {e.strerror or e}") from e
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
        """Release this cache's remaining claims and close the database."""
        try:
            self.release()
        except sqlite3.Error:
            pass
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from its first statement."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _live(self, owner: str | None, pid: int | None, host: str | None, beat: float) -> bool:
        if owner is None:
            return False
        if owner == self.owner:
            return True
        if time.time() - beat > STALE_AFTER_S:
            return False
        # same machine: a process that is gone holds nothing, whatever its last heartbeat
        return not (host == self.host and pid is not None and not _pid_alive(pid))

    def claim(self, keys: Sequence[str], *, since: float) -> Claims:
        """Claim ``keys`` for sending, atomically against other runs on this cache.

        Args:
            keys: judgement keys this run wants to send.
            since: when this run started (``time.time()``); a key that another run stored as
                failed after it is not sent again by this run (that run has just tried it).

        Returns:
            :class:`Claims`: the keys now ours, those done (answered, or failed meanwhile by
            another run), and those another live run is sending.
        """
        result = Claims()
        wanted = list(dict.fromkeys(keys))
        now = time.time()
        with self._transaction() as db:
            status: dict[str, tuple[str, float]] = {}
            held: dict[str, tuple[Any, ...]] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, st, updated in db.execute(
                    f"SELECT key, status, updated_at FROM judgements WHERE key IN ({marks})", chunk
                ):
                    status[key] = (st, updated)
                for key, *claim in db.execute(
                    f"SELECT key, owner, pid, host, heartbeat FROM claims WHERE key IN ({marks})",
                    chunk,
                ):
                    held[key] = tuple(claim)
            for key in wanted:
                st, updated = status.get(key, ("", 0.0))
                if st == "answered":
                    result.done.append(key)
                elif key in held and held[key][0] != self.owner and self._live(*held[key]):
                    result.busy.append(key)
                elif st == "failed" and updated >= since:
                    result.done.append(key)
                else:
                    result.claimed.append(key)
            db.executemany(
                """
                INSERT INTO claims (key, owner, pid, host, heartbeat, attempts)
                VALUES (?, ?, ?, ?, ?, 0)
                ON CONFLICT (key) DO UPDATE SET
                    owner = excluded.owner, pid = excluded.pid, host = excluded.host,
                    heartbeat = excluded.heartbeat
                """,
                [(key, self.owner, self.pid, self.host, now) for key in result.claimed],
            )
        return result

    def count_attempt(self, key: str) -> None:
        """Count one request about to be sent for ``key`` (claimed by this cache)."""
        self._db.execute(
            "UPDATE claims SET attempts = attempts + 1, heartbeat = ? WHERE key = ? AND owner = ?",
            (time.time(), key, self.owner),
        )

    def heartbeat(self) -> None:
        """Mark this cache's claims as alive (call every :data:`HEARTBEAT_S` while sending)."""
        self._db.execute(
            "UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner)
        )

    def release(self) -> None:
        """Give up this cache's claims; their attempt counts stay for whoever sends them next."""
        with self._transaction() as db:
            db.execute("DELETE FROM claims WHERE owner = ? AND attempts = 0", (self.owner,))
            db.execute("UPDATE claims SET owner = NULL WHERE owner = ?", (self.owner,))

    def _take_claim(self, db: sqlite3.Connection, key: str, attempts: int) -> int:
        """Drop our claim on ``key``; the attempts to record: the claim's count if we held it
        (every run's requests since the last outcome), else ``attempts``."""
        row = db.execute(
            "SELECT attempts FROM claims WHERE key = ? AND owner = ?", (key, self.owner)
        ).fetchone()
        if row is None:
            return attempts
        db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))
        return int(row[0]) or attempts

    _COLUMNS = (
        "key, status, reply, error, attempts, prompt_tokens, completion_tokens, model, request"
    )

    @staticmethod
    def _row(row: tuple[Any, ...]) -> CachedJudgement:
        """The row as a judgement; ``ValueError`` if it does not decode to one."""
        key, status, reply, error, attempts, prompt_tokens, completion_tokens, model, request = row
        try:
            parsed = json.loads(request)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"request is not JSON ({type(exc).__name__})") from None
        texts = (reply, error, model)
        counts = (attempts, prompt_tokens, completion_tokens)
        if (
            status not in ("answered", "failed")
            or not isinstance(parsed, dict)
            or not all(v is None or isinstance(v, str) for v in texts)
            or not all(
                v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in counts
            )
            or (status == "answered") != isinstance(reply, str)
        ):
            raise ValueError("fields of the wrong type")
        return CachedJudgement(
            key, status, reply, error, attempts, prompt_tokens, completion_tokens, model, parsed
        )

    def get(self, key: str) -> CachedJudgement | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedJudgement]:
        """The judgements stored for ``keys`` (missing keys are left out). Rows that cannot be
        read — larger than :data:`MAX_ROW_BYTES`, or not decoding — are left out too: reported
        in one log line and removed, so that their judgements are sent again."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CachedJudgement] = {}
        unreadable: dict[str, str] = {}
        for start in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, size in self._db.execute(
                f"SELECT key, {_ROW_BYTES} FROM judgements WHERE key IN ({marks})", chunk
            ):
                if size > MAX_ROW_BYTES:  # never loaded: a huge reply would exhaust memory
                    unreadable[key] = f"{size} bytes, over {MAX_ROW_BYTES}"
            for row in self._db.execute(
                f"SELECT {self._COLUMNS} FROM judgements WHERE key IN ({marks}) "
                f"AND {_ROW_BYTES} <= ?",
                [*chunk, MAX_ROW_BYTES],
            ):
                try:
                    found[row[0]] = self._row(row)
                except ValueError as exc:
                    unreadable[str(row[0])] = str(exc)
        if unreadable:
            self._set_aside(unreadable)
        return found

    def _set_aside(self, unreadable: dict[str, str]) -> None:
        keys = list(unreadable)
        with self._transaction() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM judgements WHERE key IN ({marks})", chunk)
        self.set_aside += len(keys)
        example = next(iter(unreadable.values()))
        log.warning(
            "judge cache %s: %d row(s) could not be read (e.g. %s) and were removed; their "
            "judgements will be sent again, every other row is kept",
            self.path,
            len(keys),
            example,
        )

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
        """Store the judge's reply. Replaces a failure; an existing answer is kept as it is.

        ``attempts`` is the number of requests this call made; when this cache holds a claim on
        ``key``, the claim's count (requests of every run since the last outcome) is used."""
        with self._transaction() as db:
            attempts = self._take_claim(db, key, attempts)
            db.execute(
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
        """Record that ``key`` got no reply. Never replaces an answer. ``attempts`` as in
        :meth:`put_answer`."""
        with self._transaction() as db:
            attempts = self._take_claim(db, key, attempts)
            db.execute(
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
