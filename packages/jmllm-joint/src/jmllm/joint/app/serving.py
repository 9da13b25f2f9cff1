"""Serving the explorer page offline: Gradio loaded only when asked for, nothing fetched, no share link.

- :func:`require_gradio`: the ``gradio`` module (the ``app`` extra), its analytics and version
  check switched off first, or :class:`AppUnavailableError` naming the extra to install.
- :func:`offline_theme`: Gradio's default theme with system fonts (nothing fetched from a CDN).
- :func:`launch`: serves a page of :func:`jmllm.joint.app.page.build_app`: one queue of
  concurrency 1 for the model (:data:`QUEUE_SIZE` waiting at most), no share link nor Gradio's
  banner suggesting one, 127.0.0.1 unless another host is given, an upload size limit, at most
  :data:`SESSION_CAPACITY` sessions kept.
- :data:`DELETE_CACHE`: how old uploads and result files get before they are deleted.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from jmllm.joint.app.session import MAX_UPLOAD_BYTES

APP_EXTRA_HINT = 'the explorer app needs Gradio: pip install "jmllm-joint[app]"'
QUEUE_SIZE = 32  # requests waiting for the model; more are refused with a message
SESSION_CAPACITY = 64  # browser sessions whose state is kept (each holds an image and t)
# Gradio's delete_cache: every 5 minutes, uploads and result files older than 30 minutes go
DELETE_CACHE = (300, 1800)
SYSTEM_FONTS = (
    "system-ui",
    "-apple-system",
    "Segoe UI",
    "Roboto",
    "Helvetica",
    "Arial",
    "sans-serif",
)
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")
APP_CSS = """
#jm-words label { font-size: 1rem; }
.jm-note { background: #fff4d6; border-left: 4px solid #e69f00; padding: .4rem .8rem; }
"""


class AppUnavailableError(ImportError):
    """Gradio (the ``app`` extra) is not installed."""


def require_gradio() -> Any:
    """The ``gradio`` module, or :class:`AppUnavailableError` naming the extra to install.

    Gradio's analytics and version check (requests to api.gradio.app) are switched off for the
    whole process before it is imported: the explorer must work with the network unreachable.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        import gradio
    except ImportError:
        raise AppUnavailableError(APP_EXTRA_HINT) from None
    return gradio


def offline_theme() -> Any:
    """Gradio's default theme with system fonts: no font is fetched from anywhere."""
    gr = require_gradio()
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def launch(
    app: Any,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    max_file_size: int = MAX_UPLOAD_BYTES,
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Serve the explorer offline: one queue of concurrency 1 for the model, no share link, no
    analytics, system fonts, an upload size limit.

    Args:
        app: from :func:`~jmllm.joint.app.page.build_app`.
        host: interface to bind (default loopback only).
        port: TCP port (None: the first free one from 7860).
        max_file_size: largest upload in bytes (the page refuses larger files).
        block: serve until interrupted; False returns at once (tests: call ``app.close()``).
        quiet: not even the one line of ours that says where the page is (Gradio's own
            banner, which suggests a public share link, is never printed).

    Returns:
        What ``gr.Blocks.launch`` returns (``app, local_url, share_url``).

    Example:
        >>> launch(build_app(model), port=7861)  # doctest: +SKIP
    """
    require_gradio()
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    # Gradio's own banner is off: it suggests a public share link, which the explorer never
    # makes; one line of ours says where the page is
    launched = app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        max_file_size=max_file_size,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        footer_links=[],
        state_session_capacity=SESSION_CAPACITY,
        theme=offline_theme(),
        css=APP_CSS,
    )
    if not quiet:
        print(f"jmllm explorer: {app.local_url} (Ctrl-C stops it)", file=sys.stdout, flush=True)
    if block:
        app.block_thread()
    return launched


def _prune(folder: Path, pattern: str, age: float) -> None:
    """Remove the entries of ``folder`` matching ``pattern`` that are older than ``age`` s."""
    limit = time.time() - age
    for entry in folder.glob(pattern):
        try:
            if entry.lstat().st_mtime < limit:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        except OSError:  # removed meanwhile, or in use: the next call tries again
            continue


__all__ = [
    "APP_CSS",
    "APP_EXTRA_HINT",
    "DELETE_CACHE",
    "MONO_FONTS",
    "QUEUE_SIZE",
    "SESSION_CAPACITY",
    "SYSTEM_FONTS",
    "AppUnavailableError",
    "launch",
    "offline_theme",
    "require_gradio",
]
