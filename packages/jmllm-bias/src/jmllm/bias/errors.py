"""The one error type bad input raises, so the CLI can print it on one line without a traceback
and exit with code 2 (:func:`jmllm.align.options.exit_code_for`: a ``ValueError``)."""

from __future__ import annotations

__all__ = ["BiasInputError"]


class BiasInputError(ValueError):
    """Bad input (spec, cohort folder, characteristic, results folder): the message names it.

    Example:
        >>> str(BiasInputError("spec.json: groups must not be empty"))
        'spec.json: groups must not be empty'
    """
