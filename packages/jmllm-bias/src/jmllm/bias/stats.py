"""Statistics of the score deltas: mean, seeded bootstrap confidence interval, Wilcoxon test.

The bootstrap and the Wilcoxon convention are jmllm-joint's (:mod:`jmllm.joint.faithfulness.stats`), one
implementation for every report of the align ← joint ← bias chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jmllm.joint.faithfulness.stats import bootstrap_ci, wilcoxon_p

__all__ = ["DeltaStats", "bootstrap_ci", "delta_stats", "wilcoxon_p"]


@dataclass(frozen=True)
class DeltaStats:
    """Summary of a set of per-image score deltas."""

    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    wilcoxon_p: float | None
    n_nonzero: int


def delta_stats(deltas: Sequence[float], seed: int = 0, confidence: float = 0.95) -> DeltaStats:
    """Mean, bootstrap CI and Wilcoxon p-value of ``deltas``.

    Example:
        >>> s = delta_stats([-1, -2, 0, -1])
        >>> s.n, s.mean, s.n_nonzero
        (4, -1.0, 3)
    """
    ci = bootstrap_ci(deltas, confidence=confidence, seed=seed)
    return DeltaStats(
        n=len(deltas),
        mean=float(np.mean(deltas)) if len(deltas) else None,
        ci_low=ci[0] if ci else None,
        ci_high=ci[1] if ci else None,
        wilcoxon_p=wilcoxon_p(deltas) if len(deltas) else None,
        n_nonzero=int(np.count_nonzero(np.asarray(deltas))),
    )
