"""The one exception type the harness raises for bad input or configuration.

The CLI prints its message (which names the input and the problem) instead of a stack trace.
"""

from __future__ import annotations

__all__ = ["JudgeError"]


class JudgeError(Exception):
    """A problem with the user's input or configuration, stated in the message."""
