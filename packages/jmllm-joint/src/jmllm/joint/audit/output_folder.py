"""An output folder one run at a time writes: its lock, held for every process of the run, the
claim of its settings file (a folder holding another run is refused) and accelerate's state of
this process.

The hallucination audit, the benchmarks and the faithfulness run share these.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from jmllm.align.files import atomic_write_text, folder_lock, refuse_link
from jmllm.joint.audit.dataset import AuditError

LOCK_FILE = ".jmllm-audit.lock"  # held by the run writing the folder (jmllm.align.files)
LOCK_OWNER = "jmllm-joint hallucination-audit"


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _use_cpu() -> bool:
    """CPU processes (``accelerate launch --cpu``, or no GPU): accelerate then splits over gloo."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def process_state() -> Any:
    """accelerate's ``PartialState`` of this process (one process when not launched). In a run
    split between processes, the process group is left when the interpreter exits."""
    from accelerate import PartialState

    state = PartialState(cpu=_use_cpu())
    if state.num_processes > 1:
        _leave_at_exit()
    return state


@functools.cache
def _leave_at_exit() -> None:
    """Register :func:`_leave_process_group` at exit, once a process."""
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    """Destroy the default process group before the interpreter's teardown: a group left to
    it can abort a process whose work is done ("terminate called without an active
    exception", exit code -6), failing the launch that ran it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_folder(
    folder: str | os.PathLike[str] | None,
    state: Any = None,
    *,
    owner: str = LOCK_OWNER,
    lock_file: str = LOCK_FILE,
    error: type[Exception] = AuditError,
) -> Iterator[None]:
    """One run at a time writes an audit folder: the run's main process holds the folder's lock
    (:func:`jmllm.align.files.folder_lock`, re-entrant in one thread) while the body runs, and
    every process of the run learns whether it got it, so a refused run stops all its processes
    instead of leaving some waiting at a barrier.

    Args:
        folder: the output folder (None: nothing to hold).
        state: accelerate's state of this process (default :func:`process_state`).
        owner, lock_file, error: who holds the lock (named to a refused run), the lock's file
            name and the error raised; the defaults are the hallucination audit's (the
            faithfulness benchmark passes its own).

    Raises:
        AuditError: another run holds the folder (the message names its process).
    """
    state = state or process_state()
    folder = Path(folder) if folder is not None else None
    if folder is None:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder")
    refused = None
    with contextlib.ExitStack() as stack:
        if state.is_main_process:
            try:
                stack.enter_context(folder_lock(folder, owner, lock_file, error))
            except error as exc:
                refused = str(exc)
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = broadcast_object_list([refused], from_process=0)
            refused = box[0]
        if refused is not None:
            raise error(refused)
        yield


def claim_folder(
    folder: Path,
    settings_file: str,
    doc: dict[str, Any],
    *,
    write: bool = True,
    what: str = "an audit",
    error: type[Exception] = AuditError,
) -> None:
    """Refuse a resumable run's folder whose settings file describes another run (another
    ``digest``), naming what differs; write ``doc`` there if ``write``.

    Args:
        folder: the output folder; settings_file: the settings file's name in it.
        doc: ``{"settings": ..., "model": ..., "digest": ..., ...}`` of this run.
        write: write the file (the main process does).
        what: the run's kind as the message names it; error: the error raised.
    """
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder")
    path = folder / settings_file
    refuse_link(path)  # a planted link: refused, never followed
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            before = None
        if isinstance(before, dict) and before.get("digest") not in (None, doc.get("digest")):
            changed = _differences(before, doc)
            raise error(
                f"{folder}: holds {what} made with other settings ({changed}); "
                "choose another output folder to keep both"
            )
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    diffs = []
    for part in ("settings", "model"):
        old, new = before.get(part) or {}, now.get(part) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return "; ".join(diffs) or "digest differs"


__all__ = [
    "LOCK_FILE",
    "LOCK_OWNER",
    "claim_folder",
    "exclusive_folder",
    "process_state",
]
