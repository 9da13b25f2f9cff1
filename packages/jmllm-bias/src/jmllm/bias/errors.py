"""The one error type bad input raises, so the CLI can print it on one line without a traceback
and exit with code 2 (:data:`jmllm.bias.conventions.EXIT_USAGE`)."""

from __future__ import annotations

from .conventions import UsageError

__all__ = ["BiasInputError"]


class BiasInputError(UsageError):
    """Bad input (spec, cohort folder, characteristic, results folder): the message names it.

    Example:
        >>> str(BiasInputError("spec.json: groups must not be empty"))
        'spec.json: groups must not be empty'
    """
