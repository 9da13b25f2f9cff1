"""Crash-safe file writing shared by generation, assessment and report.

Whole files are written atomically (a temporary file in the same folder, then ``os.replace``);
records are appended to JSONL files with one ``write`` call per line on a file opened with
``O_APPEND``, so processes appending at once never interleave inside a line, and a crash loses at
most the line being written (readers skip a torn last line). Files get ordinary permissions
(``0o666 & ~umask``).

:func:`folder_lock` makes one run at a time the writer of an output folder: a second
``jmllm-bias assess`` into the same ``--out`` is refused instead of assessing (and recording)
every portrait a second time. The lock is the kernel's (``flock``): a run that is killed releases
it, so nothing stale is ever left to clean up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import BiasInputError

__all__ = [
    "LOCK_FILE",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_text",
    "folder_lock",
    "read_jsonl",
    "sha256_file",
]

# One implementation (jmllm.align.files) of atomic writes, JSONL appends and the folder lock.
from jmllm.align import files
from jmllm.align.files import append_jsonl, read_jsonl
from jmllm.joint.render.report import atomic_write_bytes, atomic_write_text

LOCK_FILE = ".jmllm-bias.lock"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold the exclusive lock of an output folder (created if missing) while the body runs
    (:func:`jmllm.align.files.folder_lock`, the one implementation).

    Args:
        folder: the output folder.
        what: the command, for the message another run gets (e.g. ``"assess"``).

    Raises:
        BiasInputError: another run (another process or thread) holds the folder's lock.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with folder_lock(out, "assess"):
        ...     with folder_lock(out, "assess"):  # the same thread again: fine
        ...         pass
    """
    with files.folder_lock(folder, f"jmllm-bias {what}", LOCK_FILE, BiasInputError) as root:
        yield root
