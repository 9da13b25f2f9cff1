"""Statistics of the score deltas: mean, seeded bootstrap confidence interval, Wilcoxon test."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DeltaStats", "bootstrap_ci", "delta_stats", "wilcoxon_p"]

_BATCH_VALUES = 2_000_000  # resampled values held at once by the bootstrap (16 MB of float64)


def bootstrap_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean, reproducible through ``seed``.

    ``scipy.stats.bootstrap`` (``method="percentile"``, the generator
    ``numpy.random.default_rng(seed)``), resampled in batches of about two million values, so the
    memory stays bounded whatever the sample size.

    Args:
        values: the sample (e.g. per-image score deltas).
        confidence: coverage of the interval.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling generator (same seed, same interval).

    Returns:
        ``(low, high)``, or ``None`` with fewer than two values.

    Example:
        >>> low, high = bootstrap_ci([1, 2, 3, 4, 5])
        >>> low < 3 < high
        True
    """
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return None
    result = bootstrap(
        (x,),
        np.mean,
        n_resamples=n_resamples,
        batch=max(1, _BATCH_VALUES // x.size),
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def wilcoxon_p(values: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of ``values`` against zero (scipy).

    Zero values are dropped (``zero_method="wilcox"``, scipy's default), so the test is about the
    pairs that differ. With no non-zero value there is nothing to rank: the test is undefined and
    the result is ``None`` (reported as "n/a"), never a p-value of 1 that no test produced.

    Returns:
        The p-value, or ``None`` when no value is non-zero (or none is given).

    Example:
        >>> wilcoxon_p([0, 0, 0]) is None
        True
        >>> wilcoxon_p([-1, -2, -1, -3, -2, -1, -2, -1]) < 0.05
        True
    """
    from scipy.stats import wilcoxon

    x = np.asarray(values, dtype=np.float64)
    if np.count_nonzero(x) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-sample / ties notices; the p-value is still valid
        p = float(wilcoxon(x, zero_method="wilcox", alternative="two-sided").pvalue)
    return None if math.isnan(p) else p


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
