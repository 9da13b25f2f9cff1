"""Atomic file writes: a temporary file in the same folder, flushed and fsynced, then
``os.replace``; the file gets ordinary permissions (``0o666 & ~umask``) and the temporary file is
removed on any error (see :mod:`jmllm.userstudy.conventions`)."""

from __future__ import annotations

from pathlib import Path

from . import conventions

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
    >>> atomic_write_bytes(p, b"x"); p.read_bytes()
    b'x'
    """
    conventions.atomic_write_bytes(path, data)


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
