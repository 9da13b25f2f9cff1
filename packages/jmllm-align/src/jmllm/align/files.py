"""How every jmllm package writes output files (docs/conventions.md).

- **Atomic**: a temporary file in the same folder, flushed and fsynced, then ``os.replace``d over
  the target; readers see the old file or the new one, never half of one; the temporary file is
  removed on any error.
- **Ordinary permissions**: ``0o666 & ~umask``, what ``open()`` gives a new file (``mkstemp``
  alone gives 0600, which hid W files, training runs and reports from the rest of a group).
- **No empty folders left behind**: :func:`output_folder` removes the folders it created when
  the work inside fails before writing anything.
- **One writer per output folder**: :func:`folder_lock` holds the kernel's exclusive lock
  (``flock``) of a folder while a run writes into it; a second run is refused with one line
  naming the holder's process, and a killed run releases it (nothing stale to clean up).
- **Appended records** (JSONL logs that a rerun resumes from): :func:`append_jsonl` writes each
  record as one line with one ``write`` on a file opened with ``O_APPEND``, then fsyncs, so
  processes appending at once never interleave inside a line and a kill loses at most the line
  being written; :func:`read_jsonl` skips a torn line.

Every writer in ``jmllm-align`` and the packages above it (``jmllm-joint``, ``jmllm-bias``) goes
through :func:`atomic_write` / :func:`atomic_write_bytes`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "FolderBusyError",
    "append_jsonl",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "current_umask",
    "file_mode",
    "folder_lock",
    "folder_mode",
    "output_folder",
    "read_jsonl",
]

log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc).

    Elsewhere it is read with the ``os.umask`` round trip (briefly setting it, then restoring).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions of a new output file: ``0o666 & ~umask`` (0644 under the usual 022).

    Example:
        >>> file_mode() == 0o666 & ~current_umask()
        True
    """
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The permissions of a new output folder: ``0o777 & ~umask`` (``mkdtemp`` gives 0700)."""
    return 0o777 & ~current_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is fsynced and given :func:`file_mode` before the rename, and removed if
    ``write`` (or anything after it) fails. The parent folder is created.

    Args:
        path: the file to (re)place.
        write: writes the content to the path it is given (e.g. ``torch.save(obj, tmp)``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.txt"
        >>> atomic_write(target, lambda tmp: pathlib.Path(tmp).write_text("hi")).read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:  # the writer may have closed its own handle unsynced
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Example:
        >>> import pathlib, tempfile
        >>> atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "a.bin", b"x").read_bytes()
        b'x'
    """
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def output_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Create ``path`` (and missing parents) for the duration of some work; if the work raises
    and the folders it created are still empty, remove them again.

    A folder that existed before is never removed, and nothing is removed after success.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.

    Example:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "run" / "out"
        >>> try:
        ...     with output_folder(out):
        ...         raise RuntimeError("model failed to load")
        ... except RuntimeError:
        ...     pass
        >>> out.parent.exists()
        False
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a folder")
    created: list[Path] = []
    for folder in [*reversed(target.parents), target]:
        if not folder.exists():
            created.append(folder)
    target.mkdir(parents=True, exist_ok=True)
    try:
        yield target
    except BaseException:
        for folder in reversed(created):  # deepest first
            try:
                folder.rmdir()  # only succeeds on an empty folder
            except OSError:
                break
        raise


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_writable_folder(target: Path, folder: Path, what: str) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {target}: cannot write in {existing} (permission denied)")


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Check, before any work, that a file can be written at ``path``: it is not a folder, no
    part of its folder is a file, and the nearest existing folder is writable.

    Raises:
        IsADirectoryError, NotADirectoryError, PermissionError: naming ``what``, the path and
            the problem (bad input: exit code 2).

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> check_output_file(root / "new" / "w.safetensors").name
        'w.safetensors'
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{what} {target}: is a folder; give a file name")
    _check_writable_folder(target, target.parent, what)
    return target


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Check, before any work, that ``path`` is (or can be created as) a writable folder.

    Raises:
        NotADirectoryError, PermissionError: naming ``what``, the path and the problem (bad
            input: exit code 2).

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "f").write_text("x")
        >>> try:
        ...     check_output_dir(root / "f", "--out")
        ... except NotADirectoryError as exc:
        ...     print(str(exc).replace(str(root), "ROOT"))
        --out ROOT/f: exists and is not a folder
    """
    target = Path(path)
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{what} {target}: exists and is not a folder")
    _check_writable_folder(target, target, what)
    return target


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON record as one line, durably (fsync), safe with concurrent appenders.

    The line is written with one ``write`` call on a file opened with ``O_APPEND``, so processes
    appending at once never interleave inside a line; a crash loses at most the line being
    written, and a torn last line left by one never swallows the next record. A new file gets
    :func:`file_mode` permissions.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
        >>> append_jsonl(target, {"a": 1}); append_jsonl(target, {"a": 2})
        >>> [r["a"] for r in read_jsonl(target)]
        [1, 2]
    """
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
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
    """The records of a JSONL file; lines that are not JSON objects (a torn tail) are skipped.
    A missing file has no records.

    Example:
        >>> list(read_jsonl("/nonexistent.jsonl"))
        []
    """
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # a torn or absurdly nested line
                log.warning("%s:%d: skipping a line that is not JSON (interrupted write?)", path, n)
                continue
            if isinstance(record, dict):
                yield record


class FolderBusyError(ValueError):
    """Another run holds the output folder's lock (bad usage: exit code 2)."""


# Folders this process holds the lock of, per thread: a command takes the lock for its whole run
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
def folder_lock(
    folder: str | os.PathLike[str],
    what: str,
    lock_name: str = ".jmllm.lock",
    error: type[Exception] = FolderBusyError,
) -> Iterator[Path]:
    """Hold the exclusive lock of an output folder (created if missing) while the body runs.

    The lock file holds the holder's process id and is removed (still locked) on exit; the same
    thread may take the lock again inside the body.

    Args:
        folder: the output folder.
        what: the command, for the message another run gets (e.g. ``"jmllm-bias assess"``).
        lock_name: the lock file's name inside the folder.
        error: the exception class raised when another run holds the lock.

    Raises:
        ``error``: another run (another process or thread) holds the folder's lock.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with folder_lock(out, "jmllm-joint hallucination-audit"):
        ...     with folder_lock(out, "jmllm-joint hallucination-audit"):  # same thread: fine
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
    path = root / lock_name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise error(
                f"{root}: another {what} (process {holder}) is writing here; wait for it to "
                "finish (a rerun then resumes) or use another --out"
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
