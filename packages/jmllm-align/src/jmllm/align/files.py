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
- **Never through a link**: every file the project creates or appends to — whole files, logs,
  locks, caches — is opened without following a symbolic link at its name (``O_NOFOLLOW``,
  :func:`open_nofollow`; :func:`refuse_link` before a rename), and must be a regular file: a
  link planted in an output folder is refused with one line, its target untouched.
- **Paths from data files stay in their root**: :func:`resolve_inside` refuses a ``file_name``
  that is absolute, climbs out with ``..`` or resolves (through a link) outside the folder the
  data file declares.
- **Output folders are the command's own**: :func:`output_folder` with a ``command`` refuses a
  folder that holds entries the command did not write unless ``force``, and even then never
  replaces or deletes one of them; what a command wrote is listed in the folder's
  :data:`OUTPUTS_RECORD`.
- **JSON from users**: :func:`read_json` reads a file with one-line errors for every way it can
  be bad, nesting too deep for Python included.

Every writer in ``jmllm-align`` and the packages above it (``jmllm-joint``, ``jmllm-bias``) goes
through :func:`atomic_write` / :func:`atomic_write_bytes`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OUTPUTS_RECORD",
    "FolderBusyError",
    "ForeignOutputError",
    "UnsafePathError",
    "append_jsonl",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_claim",
    "check_output_dir",
    "check_output_file",
    "claim_beside",
    "claim_output_folder",
    "current_umask",
    "file_mode",
    "folder_lock",
    "folder_mode",
    "foreign_entries",
    "open_nofollow",
    "output_folder",
    "parse_json",
    "read_json",
    "read_jsonl",
    "refuse_link",
    "resolve_inside",
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


class UnsafePathError(ValueError):
    """A path refused for safety (bad input: exit code 2): an output that is a symbolic link or
    not a regular file, a data path that leaves its root, a folder that is not the command's."""


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# close-on-exec; non-blocking so that a FIFO planted at an output name cannot hang the open
_O_EXTRA = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _link_refused(path: Path, what: str) -> UnsafePathError:
    return UnsafePathError(
        f"{what} {path}: is a symbolic link; jmllm never writes through a link (remove it, or "
        "choose another output)"
    )


def refuse_link(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Refuse to write at ``path`` if it is a symbolic link, or exists as anything but a regular
    file; a missing path is fine.

    Raises:
        UnsafePathError: naming ``what``, the path and the problem.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "link").symlink_to(root / "victim")
        >>> try:
        ...     refuse_link(root / "link", "report")
        ... except UnsafePathError as exc:
        ...     print(str(exc).replace(str(root), "ROOT").split(";")[0])
        report ROOT/link: is a symbolic link
    """
    target = Path(path)
    try:
        mode = os.lstat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return target
    if stat.S_ISLNK(mode):
        raise _link_refused(target, what)
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UnsafePathError(f"{what} {target}: exists and is {kind}")
    return target


def open_nofollow(
    path: str | os.PathLike[str], flags: int, mode: int = 0o666, what: str = "output"
) -> int:
    """``os.open`` for a file the project writes: a symbolic link at ``path`` is refused
    (``O_NOFOLLOW``; where the system has none, by looking first), and so is anything that is
    not a regular file (a FIFO, a device).

    Returns:
        The open file descriptor (close-on-exec).

    Raises:
        UnsafePathError: ``path`` is a link or not a regular file (its target is untouched).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> fd = open_nofollow(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        >>> os.write(fd, b"{}\\n")
        3
        >>> os.close(fd)
    """
    target = Path(path)
    if not _O_NOFOLLOW:
        refuse_link(target, what)
    try:
        fd = os.open(target, flags | _O_NOFOLLOW | _O_EXTRA, mode)
    except OSError as exc:
        if os.path.islink(target):  # ELOOP (Linux, macOS) or EMLINK (FreeBSD)
            raise _link_refused(target, what) from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise UnsafePathError(f"{what} {target}: exists and is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{what} {target}: exists and is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolve_inside(root: str | os.PathLike[str], relative: object, what: str = "path") -> Path:
    """``root / relative`` for a path read from a data file, refused unless it stays inside
    ``root``: no absolute path, no ``..``, and no symbolic link that leads out of ``root``.

    Args:
        root: the folder the data file declares (e.g. ``--images``).
        relative: the path as the data file gives it.
        what: names the field in messages (e.g. ``"images[3].file_name"``).

    Returns:
        ``root / relative`` (not resolved: messages keep the user's spelling).

    Raises:
        UnsafePathError: one line naming ``what``, the path (cut to 200 characters) and why.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> resolve_inside(root, "a/b.png").name
        'b.png'
        >>> try:
        ...     resolve_inside(root, "../secret.png", "images[0].file_name")
        ... except UnsafePathError as exc:
        ...     print(str(exc).split(";")[0])
        images[0].file_name '../secret.png': leaves its folder with '..'
    """
    from jmllm.align.options import clip

    if not isinstance(relative, str):
        raise UnsafePathError(
            f"{what}: must be a relative path (text), got {type(relative).__name__}"
        )
    shown = repr(clip(relative))
    if not relative or "\x00" in relative:
        raise UnsafePathError(f"{what} {shown}: not a file name")
    pure = Path(relative)
    if pure.is_absolute() or pure.drive or pure.root:
        raise UnsafePathError(
            f"{what} {shown}: an absolute path; paths here are relative to {root}"
        )
    if ".." in pure.parts:
        raise UnsafePathError(
            f"{what} {shown}: leaves its folder with '..'; paths here stay in {root}"
        )
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafePathError(
            f"{what} {shown}: a symbolic link that leads out of {root}; paths here stay inside it"
        )
    return Path(root) / pure


def read_json(path: str | os.PathLike[str], what: str | None = None) -> Any:
    """The JSON document of a user's file; every way the file can be bad is one line naming it:
    missing, unreadable, not UTF-8, not JSON, nested deeper than Python can read.

    Raises:
        ValueError: the one-line message (bad input: exit code 2).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "deep.json"
        >>> _ = p.write_text("[" * 100_000 + "]" * 100_000)
        >>> try:
        ...     read_json(p, "annotations")
        ... except ValueError as exc:
        ...     print(exc)
        annotations: not valid JSON (nested too deeply)
    """
    label = what or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{label}: is a folder, not a file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{label}: not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"{label}: cannot be read ({exc.strerror or exc})") from None
    return parse_json(text, label)


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` with one-line errors naming ``what`` (malformed, or nested too deeply).

    Example:
        >>> parse_json('{"a": [1]}', "provenance")
        {'a': [1]}
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ValueError(f"{what}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"{what}: not valid JSON ({type(exc).__name__})") from None


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
    refuse_link(path)  # os.replace would not follow it, but a link here was planted: say so
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


OUTPUTS_RECORD = ".jmllm-outputs.json"  # in an output folder: which entries which command wrote


class ForeignOutputError(UnsafePathError):
    """An output folder holds entries the command did not write (bad usage: exit code 2)."""


def _read_record(folder: Path) -> dict[str, str]:
    path = folder / OUTPUTS_RECORD
    if os.path.islink(path) or not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {str(k): str(v) for k, v in entries.items() if isinstance(v, str)}


def _write_record(folder: Path, entries: dict[str, str]) -> None:
    doc = {"format": 1, "entries": dict(sorted(entries.items()))}
    atomic_write_text(folder / OUTPUTS_RECORD, json.dumps(doc, indent=1) + "\n")


def _owned(name: str, owner: str | None, command: str) -> bool:
    if owner == command:
        return True
    # an atomic write's temporary file, left by a killed run, belongs with its file
    return name.startswith(".") and name.endswith(".tmp")


def foreign_entries(folder: str | os.PathLike[str], command: str) -> list[str]:
    """Names of the entries of ``folder`` that ``command`` did not write, by the folder's
    :data:`OUTPUTS_RECORD` (a symbolic link is never the command's); sorted.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "README.md").write_text("mine")
        >>> foreign_entries(root, "jmllm-joint sample-data")
        ['README.md']
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    record = _read_record(root)
    foreign = []
    for entry in os.scandir(root):
        if entry.name == OUTPUTS_RECORD:
            continue
        if entry.is_symlink() or not _owned(entry.name, record.get(entry.name), command):
            foreign.append(entry.name)
    return sorted(foreign)


def _listed(names: list[str], limit: int = 3) -> str:
    from jmllm.align.options import clip

    shown = ", ".join(clip(n, 60) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim_output_folder(
    folder: str | os.PathLike[str],
    command: str,
    outputs: Sequence[str],
    *,
    force: bool = False,
    what: str = "--out",
) -> Path:
    """Check that ``command`` may write its ``outputs`` into ``folder``, and record them as its
    own in the folder's :data:`OUTPUTS_RECORD` (before the work, so that a killed run's files are
    still its own when it is rerun).

    - A new or empty folder, or one holding only what ``command`` wrote before: fine.
    - Anything else in it (a user's files, another command's, a planted link) refuses the folder,
      unless ``force``.
    - With ``force`` the command writes beside those entries but never replaces one: an output
      name that is taken by an entry it did not write is refused all the same.

    Args:
        folder: the output folder (created if missing).
        command: who writes, e.g. ``"jmllm-joint sample-data"``.
        outputs: the names of the files and folders ``command`` writes directly in ``folder``.
        force: write beside entries the command did not write.
        what: names the option in messages.

    Raises:
        ForeignOutputError: one line naming the folder and (some of) the entries in the way.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "README.md").write_text("the user's")
        >>> try:
        ...     claim_output_folder(root, "jmllm-joint sample-data", ["README.md"], force=True)
        ... except ForeignOutputError as exc:
        ...     print(str(exc).replace(str(root), "ROOT").split(",")[0])
        --out ROOT: README.md was not written by jmllm-joint sample-data
    """
    root = Path(folder)
    check_output_claim(root, command, outputs, force=force, what=what)
    record = {k: v for k, v in _read_record(root).items() if os.path.lexists(root / k)}
    record.update(dict.fromkeys(outputs, command))
    root.mkdir(parents=True, exist_ok=True)
    _write_record(root, record)
    return root


def claim_beside(
    named: str | os.PathLike[str],
    command: str,
    beside: Sequence[str],
    *,
    what: str = "--json-out",
) -> Path:
    """Claim the outputs a command writes *beside* a file the user names (``wsol --json-out
    FILE`` writes ``FILE.html`` and ``FILE_maps/`` next to it), in a folder the command does not
    own, and record them as its own in the folder's :data:`OUTPUTS_RECORD`.

    The rule of output folders, for names the user did not choose:

    - each of ``beside`` (names in the named file's folder) must be new, or written there
      before by ``command`` (a rerun replaces its own page): a user's file, another command's
      report or a planted link in its place is refused;
    - the named file itself is the user's choice and may be replaced, unless it is another
      jmllm command's recorded output (a report of ``jmllm-joint demo``) or the record itself.

    Args:
        named: the file the user named (e.g. ``--json-out``'s).
        command: who writes, e.g. ``"jmllm-joint wsol"``.
        beside: the names written beside it.
        what: names the option in messages.

    Returns:
        The folder, created if missing.

    Raises:
        ForeignOutputError: one line naming the option, the path and who wrote it.

    Example:
        >>> import pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "cub.html").write_text("the user's page")
        >>> try:
        ...     claim_beside(root / "cub.json", "jmllm-joint wsol", ["cub.html", "cub_maps"])
        ... except ForeignOutputError as exc:
        ...     print(str(exc).replace(str(root), "ROOT").split(";")[0])
        --json-out ROOT/cub.json: ROOT/cub.html exists and was not written by jmllm-joint wsol
    """
    path = Path(named)
    root = path.parent
    if path.name == OUTPUTS_RECORD:
        raise ForeignOutputError(f"{what} {path}: is jmllm's record of a folder's outputs")
    if os.path.lexists(root) and not root.is_dir():
        raise NotADirectoryError(f"{what} {path}: {root} is not a folder")
    refuse_link(root / OUTPUTS_RECORD, what)
    record = _read_record(root)
    owner = record.get(path.name)
    if os.path.lexists(path) and owner not in (None, command):
        raise ForeignOutputError(
            f"{what} {path}: was written by {owner}, and {command} never replaces another "
            "command's output (choose another name)"
        )
    for name in beside:
        entry = root / name
        if os.path.lexists(entry) and (record.get(name) != command or os.path.islink(entry)):
            raise ForeignOutputError(
                f"{what} {path}: {entry} exists and was not written by {command}; it never "
                f"replaces what it did not write (move it away, or choose another {what} name)"
            )
    kept = {k: v for k, v in record.items() if os.path.lexists(root / k)}
    kept.update(dict.fromkeys([path.name, *beside], command))
    root.mkdir(parents=True, exist_ok=True)
    _write_record(root, kept)
    return root


def check_output_claim(
    folder: str | os.PathLike[str],
    command: str,
    outputs: Sequence[str],
    *,
    force: bool = False,
    what: str = "--out",
) -> None:
    """The checks of :func:`claim_output_folder` alone, writing nothing: for a command that
    refuses a folder before its slow work and claims it once it has something to write.

    Raises:
        ForeignOutputError: as :func:`claim_output_folder`.

    Example:
        >>> import pathlib, tempfile
        >>> check_output_claim(pathlib.Path(tempfile.mkdtemp()) / "new", "tool", ["a.txt"])
    """
    root = Path(folder)
    if os.path.lexists(root) and not root.is_dir():
        raise NotADirectoryError(f"{what} {root}: exists and is not a folder")
    refuse_link(root / OUTPUTS_RECORD, what)
    foreign = foreign_entries(root, command)
    taken = [name for name in outputs if name in foreign]
    if taken:
        raise ForeignOutputError(
            f"{what} {root}: {_listed(taken)} {'was' if len(taken) == 1 else 'were'} not written "
            f"by {command}, which never replaces what it did not write, even with --force (move "
            f"{'it' if len(taken) == 1 else 'them'} away, or choose another folder)"
        )
    if foreign and not force:
        raise ForeignOutputError(
            f"{what} {root}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"{command} did not write ({_listed(foreign)}); choose a new or empty folder, or "
            "pass --force to write beside them (they are left untouched)"
        )


def _prune_record(folder: Path) -> None:
    """Drop the record's names that were not written after all; no record when none is left."""
    record = _read_record(folder)
    kept = {k: v for k, v in record.items() if os.path.lexists(folder / k)}
    path = folder / OUTPUTS_RECORD
    if kept == record and (kept or not path.exists()):
        return
    if kept:
        _write_record(folder, kept)
    elif not os.path.islink(path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_folder(
    path: str | os.PathLike[str],
    *,
    command: str | None = None,
    outputs: Sequence[str] = (),
    force: bool = False,
    what: str = "--out",
) -> Iterator[Path]:
    """Create ``path`` (and missing parents) for the duration of some work; if the work raises
    and the folders it created are still empty, remove them again.

    A folder that existed before is never removed, and nothing is removed after success. With a
    ``command``, the folder is first claimed for it (:func:`claim_output_folder`: refused if it
    holds entries the command did not write, unless ``force``; ``outputs`` are the names the
    command writes in it).

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
        ForeignOutputError: the folder is not the command's (with ``command``).

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
    if command is not None:
        claim_output_folder(target, command, outputs, force=force, what=what)
    target.mkdir(parents=True, exist_ok=True)
    try:
        yield target
    except BaseException:
        if command is not None and target in created:  # its record goes with the new folder
            with contextlib.suppress(FileNotFoundError):
                (target / OUTPUTS_RECORD).unlink()
        for folder in reversed(created):  # deepest first
            try:
                folder.rmdir()  # only succeeds on an empty folder
            except OSError:
                break
        raise
    if command is not None:
        _prune_record(target)


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
    fd = open_nofollow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)  # the umask applies
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
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, what="lock file")
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
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
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
