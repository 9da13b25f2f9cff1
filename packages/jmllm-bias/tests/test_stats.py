import numpy as np
import pytest

from jmllm.bias.stats import bootstrap_ci, delta_stats, wilcoxon_p


def test_bootstrap_is_seeded_and_covers_the_mean() -> None:
    values = np.random.default_rng(1).normal(-1.0, 2.0, size=40).round().tolist()
    a, b, c = (
        bootstrap_ci(values, seed=0),
        bootstrap_ci(values, seed=0),
        bootstrap_ci(values, seed=1),
    )
    assert a == b and a != c
    assert a[0] < np.mean(values) < a[1]
    # a wider confidence level gives a wider interval
    wide = bootstrap_ci(values, confidence=0.99, seed=0)
    assert wide[0] < a[0] and wide[1] > a[1]


def test_bootstrap_needs_two_values() -> None:
    assert bootstrap_ci([3.0]) is None
    assert bootstrap_ci([]) is None


def test_wilcoxon_matches_scipy_and_handles_all_zero() -> None:
    from scipy.stats import wilcoxon

    x = [-2, -1, -3, 0, 1, -2, -1, -4, 0, -1]
    assert wilcoxon_p(x) == pytest.approx(wilcoxon(x).pvalue)
    assert wilcoxon_p([0, 0, 0]) is None
    assert wilcoxon_p([1, 1, 1, 1, 1, 1, 1, 1]) < 0.01


def test_delta_stats_empty_and_single() -> None:
    empty = delta_stats([])
    assert (empty.n, empty.mean, empty.ci_low, empty.wilcoxon_p) == (0, None, None, None)
    one = delta_stats([2])
    assert (one.n, one.mean, one.ci_low) == (1, 2.0, None)
