"""The statistics convention of the reports: seeded percentile bootstrap intervals and one
Wilcoxon signed-rank convention.

- **Intervals**: ``scipy.stats.bootstrap`` with ``method="percentile"``, seeded through
  ``numpy.random.default_rng(seed)``, resampled in bounded batches. :func:`bootstrap_ci` is the
  interval of a mean; :func:`bootstrap_interval` resamples the *units* (e.g. images) of any
  statistic computed from them, so the questions or words of one image stay together.
- **Paired tests**: two-sided Wilcoxon signed-rank, zero differences dropped
  (``zero_method="wilcox"``), ``None`` when no difference is non-zero (the test is undefined
  there, never a p-value of 1 that no test produced).

``jmllm.bias.stats`` uses these; the standalone ``jmllm-judge`` keeps a copy that a test keeps
equal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "bootstrap_interval", "wilcoxon_p"]

_BATCH_VALUES = 2_000_000  # resampled values held at once by the bootstrap (16 MB of float64)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
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


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    units: int,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    cost: int = 1,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a statistic of ``units`` resampled units.

    The units (images) are resampled with replacement and ``statistic`` computes the value from
    their indices, so everything measured on one image moves together (its words, its
    thresholds). Resamples where the statistic is undefined (NaN) are left out.

    Args:
        statistic: maps indices (R, units) to values (R,).
        units: how many units there are.
        confidence, n_resamples, seed: the bootstrap.
        cost: numbers the statistic holds per resampled unit (bounds the batch's memory).

    Returns:
        ``(low, high)``, or None with fewer than two units or no defined resample.

    Example:
        >>> x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
        >>> low, high = bootstrap_interval(lambda i: x[i].mean(axis=-1), len(x))
        >>> low < 3 < high
        True
    """
    from scipy.stats import bootstrap

    if units < 2:
        return None

    def vectorised(index: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(statistic(index.astype(np.int64)), dtype=np.float64)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN of undefined resamples
        result = bootstrap(
            (np.arange(units),),
            vectorised,
            n_resamples=n_resamples,
            batch=max(1, _BATCH_VALUES // (units * max(1, cost))),
            vectorized=True,
            method="percentile",
            confidence_level=confidence,
            rng=np.random.default_rng(seed),
        )
    values = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    defined = values[~np.isnan(values)]
    if not defined.size:
        return None
    alpha = (1 - confidence) / 2
    low, high = np.quantile(defined, [alpha, 1 - alpha])
    return float(low), float(high)


def wilcoxon_p(values: Sequence[float] | np.ndarray) -> float | None:
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
