"""Small file helpers shared by every reader and writer: atomic writes, JSON and JSONL, hashes.

Writers follow the package's conventions (:mod:`jmllm.judge.conventions`): atomic, ordinary
permissions. Readers turn every way a file can be unusable (missing, unreadable, not UTF-8, not
JSON, nested too deeply) into one :class:`~jmllm.judge.errors.JudgeError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jmllm.judge.conventions import atomic_write_bytes as _atomic_write_bytes
from jmllm.judge.errors import JudgeError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "read_json",
    "read_jsonl",
    "sha256_file",
    "write_jsonl",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader (or a crash) never sees a half-written file; the file gets ordinary permissions
    (``0o666 & ~umask``)."""
    return _atomic_write_bytes(path, data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> Path:
    """Atomically write one JSON object per line (UTF-8, non-ASCII kept readable)."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records]
    return atomic_write_text(path, "".join(lines))


def _loads(text: str, where: str, lines: bool = True) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f", line {e.lineno}" if lines else ""
        raise JudgeError(f"{where}: not valid JSON ({e.msg}{at})") from None
    except RecursionError:
        raise JudgeError(f"{where}: JSON nested too deeply") from None


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON value in ``path``; ``what`` names the file's role in messages (``"manifest"``).

    Raises:
        JudgeError: the file is missing or unreadable, not UTF-8, not JSON, or nested too deeply.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JudgeError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise JudgeError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return _loads(text, f"{what} {path}")


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file; blank lines are skipped, anything else that is not a
    JSON object (or not UTF-8) is an error naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JudgeError(f"cannot read {path}: {e.strerror or e}") from None
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JudgeError(f"{path}:{number}: not UTF-8 text (byte {e.start})") from None
        if not line.strip():
            continue
        record = _loads(line, f"{path}:{number}", lines=False)
        if not isinstance(record, dict):
            raise JudgeError(
                f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
            )
        yield record


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
