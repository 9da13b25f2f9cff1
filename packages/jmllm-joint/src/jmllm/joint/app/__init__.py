"""The interactive explorer: its steps as plain functions, and the Gradio page over them.

Before 0.2 ``jmllm.joint.app`` was one module, now :mod:`jmllm.joint.app.page`; what it held is
importable from here as before.
"""

from jmllm.joint.app import page as _page
from jmllm.joint.app.page import (
    APP_EXTRA_HINT,
    AppUnavailableError,
    build_app,
    builtin_examples,
    channel_choices,
    chat_messages,
    guarded,
    launch,
    offline_theme,
    parse_channel,
    require_gradio,
)
from jmllm.joint.compat import forward_to

__all__ = [
    "APP_EXTRA_HINT",
    "AppUnavailableError",
    "build_app",
    "builtin_examples",
    "channel_choices",
    "chat_messages",
    "guarded",
    "launch",
    "offline_theme",
    "parse_channel",
    "require_gradio",
]

__getattr__ = forward_to(_page, __name__)
