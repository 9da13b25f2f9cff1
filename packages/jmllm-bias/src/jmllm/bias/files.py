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
import threading
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

# One implementation (jmllm.align.files) of atomic writes and JSONL appends for every package.
from jmllm.align.files import append_jsonl, read_jsonl
from jmllm.joint.report import atomic_write_bytes, atomic_write_text

LOCK_FILE = ".jmllm-bias.lock"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Folders this process holds the lock of, per thread: the CLI takes the lock for a whole command
# and the API functions it calls take it again (flock would refuse a second descriptor).
_HELD: dict[tuple[str, int], int] = {}


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold the exclusive lock of an output folder (created if missing) while the body runs.

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
    root = Path(folder)
    key = (str(root.resolve()), threading.get_ident())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield root
        finally:
            _HELD[key] -= 1
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise BiasInputError(
                f"{root}: another jmllm-bias {what} (process {holder}) is writing here; wait for "
                "it to finish (a rerun then resumes) or use another --out"
            )
        # The holder before us may have removed the file after we opened it: then we hold the
        # lock of a file nobody else can see, and must take the one at the path instead.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        _HELD[key] = 1
        yield root
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: nobody can lock this file after us
        os.close(fd)
