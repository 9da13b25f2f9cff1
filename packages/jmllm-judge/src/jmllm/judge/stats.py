"""Step 4a: the statistics of the report — seeded bootstrap intervals and the Wilcoxon test.

The same conventions as ``jmllm.bias.stats`` (a test keeps them equal): a percentile bootstrap of
the mean with ``scipy.stats.bootstrap``, seeded through ``numpy.random.default_rng(seed)`` and
resampled in bounded batches; a two-sided Wilcoxon signed-rank test with zero differences dropped,
``None`` when no difference is non-zero (the test is undefined there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "wilcoxon_p"]

_BATCH_VALUES = 2_000_000  # resampled values held at once by the bootstrap (16 MB of float64)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean, reproducible through ``seed``.

    ``scipy.stats.bootstrap`` (``method="percentile"``, the generator
    ``numpy.random.default_rng(seed)``), resampled in batches of about two million values, so the
    memory stays bounded whatever the sample size.

    Args:
        values: the sample (e.g. scores, or paired differences).
        resamples: bootstrap resamples.
        level: coverage of the interval.
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
        n_resamples=resamples,
        batch=max(1, _BATCH_VALUES // x.size),
        confidence_level=level,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def wilcoxon_p(values: Sequence[float] | np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of ``values`` against zero (scipy).

    Zero values are dropped (``zero_method="wilcox"``, scipy's default), so the test is about the
    pairs that differ. With no non-zero value there is nothing to rank: the test is undefined and
    the result is ``None`` (reported as "—"), never a p-value of 1 that no test produced.

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
