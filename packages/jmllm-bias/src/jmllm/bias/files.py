"""Crash-safe file writing shared by generation, assessment and report.

Whole files are written atomically (a temporary file in the same folder, then ``os.replace``);
records are appended to JSONL files with one ``write`` call per line on a file opened with
``O_APPEND``, so processes appending at once never interleave inside a line, and a crash loses at
most the line being written (readers skip a torn last line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "atomic_write_bytes", "atomic_write_text", "read_jsonl", "sha256_file"]

# One implementation of atomic whole-file writes in the joint -> bias chain.
from jmllm.joint.report import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON record as one line, durably (fsync), safe with concurrent appenders."""
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # a torn last line (killed mid-write) must not swallow this record
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file; lines that are not JSON objects (a torn tail) are skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a line that is not JSON (interrupted write?)", path, n)
                continue
            if isinstance(record, dict):
                yield record


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
