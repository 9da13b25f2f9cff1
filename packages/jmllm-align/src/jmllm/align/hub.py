"""Reaching the Hugging Face Hub: at most one attempt, then one line that says what to do.

Every command that loads a model by Hub id (``google/owlvit-base-patch32``) goes through
:func:`prepare_hub` first. Without it, a machine that cannot reach the Hub waits for
``huggingface_hub``'s retries of every file (half a minute, two dozen warning lines) before
failing. Here:

- local paths are left alone (nothing to reach);
- with ``HF_HUB_OFFLINE=1`` the ids must be in the local Hugging Face cache, else one line says
  which is missing;
- otherwise the Hub is asked once (one ``HEAD`` request to its endpoint, through
  ``huggingface_hub``'s own HTTP session, so proxies are honoured, with a short timeout). When it
  cannot be reached, ids that are all cached are loaded from the cache in offline mode (no request
  is retried), and an id that is not cached is refused with one line and the way out
  (:data:`HUB_HINT`).

Example:
    >>> prepare_hub(["runs/owlvit", None])  # local paths: nothing is asked
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["HUB_HINT", "HubUnavailableError", "hub_ids", "prepare_hub"]

logger = logging.getLogger(__name__)

HUB_HINT = (
    "use --tiny for the built-in models, or set HF_HUB_OFFLINE=1 and pass local folders "
    "(--owl DIR --mllm DIR --alignment FILE)"
)
PROBE_TIMEOUT_S = 5.0


class HubUnavailableError(OSError):
    """A model given by Hub id cannot be had: the Hub is unreachable (or offline mode is on) and
    the model is not in the local cache. Fixing the command line fixes it (exit code 2)."""

    exit_code = 2


def hub_ids(sources: Iterable[str | os.PathLike[str] | None]) -> list[str]:
    """The sources that name Hub repositories: not an existing local path, of the form
    ``name`` or ``owner/name``, in order, without repeats.

    Example:
        >>> hub_ids(["google/owlvit-base-patch32", "/no/such/dir", None, "google/owlvit-base-patch32"])
        ['google/owlvit-base-patch32']
    """
    found: list[str] = []
    for source in sources:
        if source is None:
            continue
        text = str(source)
        if not text or Path(text).expanduser().exists() or text in found:
            continue
        if text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix:
            continue  # a local path that does not exist: the loader names it
        found.append(text)
    return found


def is_cached(repo_id: str) -> bool:
    """Whether a snapshot of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or an invalid id
        return False
    return True


def probe_hub(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One request to the Hub's endpoint: None when it answers (any HTTP status), else why not
    in a few words."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # no route, no name resolution, a timeout, a proxy refusing, ...
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text[:200]
    return None


def _go_offline(constants: Any) -> None:
    """Offline mode for this process (and its children): files come from the cache only."""
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def prepare_hub(
    sources: Iterable[str | os.PathLike[str] | None],
    *,
    hint: str = HUB_HINT,
    timeout: float = PROBE_TIMEOUT_S,
) -> None:
    """Make sure the models given by Hub id can be loaded without retrying an unreachable Hub.

    Args:
        sources: model sources (Hub ids or local paths; None is skipped).
        hint: the way out the message ends with (the command's options).
        timeout: seconds the one request to the Hub may take.

    Raises:
        HubUnavailableError: an id is not in the local cache and the Hub cannot be reached (or
            ``HF_HUB_OFFLINE`` is set); the message names the id and ends with ``hint``.

    Example:
        >>> prepare_hub(["google/owlvit-base-patch32"])  # doctest: +SKIP
    """
    ids = hub_ids(sources)
    if not ids:
        return
    from huggingface_hub import constants

    if constants.is_offline_mode():
        missing = [repo for repo in ids if not is_cached(repo)]
        if missing:
            raise HubUnavailableError(
                f"{missing[0]}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
                f"{hint}"
            )
        return
    reason = probe_hub(timeout)
    if reason is None:
        return
    missing = [repo for repo in ids if not is_cached(repo)]
    if missing:
        raise HubUnavailableError(
            f"{missing[0]}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            f"({reason}) and the model is not in the local cache; {hint}"
        )
    logger.info(
        "the Hugging Face Hub cannot be reached (%s): loading %s from the local cache",
        reason,
        ", ".join(ids),
    )
    _go_offline(constants)
