"""The one exception type the harness raises for bad input or configuration.

The CLI prints its message (which names the input and the problem) instead of a stack trace, and
exits with code 2 (:data:`jmllm.judge.conventions.EXIT_USAGE`).
"""

from __future__ import annotations

from jmllm.judge.conventions import UsageError

__all__ = ["JudgeError"]


class JudgeError(UsageError):
    """A problem with the user's input or configuration, stated in the message."""
