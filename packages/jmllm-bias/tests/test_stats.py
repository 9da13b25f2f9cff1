import numpy as np
import pytest

from jmllm.bias.stats import bootstrap_ci, delta_stats, wilcoxon_p


def CI(x, resamples, level, seed):
    return bootstrap_ci(x, level, n_resamples=resamples, seed=seed)


WILCOXON = wilcoxon_p


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


# One statistics convention for jmllm-judge and jmllm-bias: both checked here against scipy
# directly, and against each other where both are installed.
BOOTSTRAP_CASES = [(2, 0), (7, 1), (50, 2), (333, 3), (5_000, 4)]


def _scipy_percentile_ci(x, level, resamples, seed):
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.asarray(x, dtype=np.float64),),
        np.mean,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return result.confidence_interval.low, result.confidence_interval.high


def _by_hand_percentile_ci(x, level, resamples, seed):
    """The straightforward percentile bootstrap: (resamples, n) indices from default_rng(seed)."""
    x = np.asarray(x, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(1)
    alpha = (1 - level) / 2
    return tuple(np.quantile(means, [alpha, 1 - alpha]))


@pytest.mark.parametrize(("n", "seed"), BOOTSTRAP_CASES)
def test_bootstrap_equals_scipy_and_the_by_hand_percentile_bootstrap(n, seed):
    x = np.random.default_rng(seed).normal(size=n).round(1)
    resamples = 10_000 if n < 1_000 else 500  # the large sample: batched resampling, kept quick
    level = 0.9 if seed % 2 else 0.95
    got = CI(x, resamples, level, seed)
    assert got == pytest.approx(
        _scipy_percentile_ci(x, level, resamples, seed), rel=1e-12, abs=1e-12
    )
    # the same draws as the hand-written bootstrap the packages used before scipy's (the means
    # may differ in the last bit: scipy sums in another order)
    assert got == pytest.approx(
        _by_hand_percentile_ci(x, level, resamples, seed), rel=1e-12, abs=1e-12
    )


def test_bootstrap_memory_is_bounded_at_large_n():
    import tracemalloc

    x = np.random.default_rng(0).normal(size=5_000)
    tracemalloc.start()
    CI(x, 10_000, 0.95, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # a (10,000, 5,000) index array at once would be 400 MB (800 MB with the values); batched, the
    # bootstrap holds about two million values at a time
    assert peak < 100e6


@pytest.mark.parametrize(
    "values",
    [[-2, -1, -3, 0, 1, -2, -1, -4, 0, -1], [1, 1, 1, 1, 1, 1, 1, 1], [0.5, -0.25, 3, 0, 0, -1]],
)
def test_wilcoxon_equals_scipy(values):
    from scipy.stats import wilcoxon

    expected = wilcoxon(values, zero_method="wilcox", alternative="two-sided").pvalue
    assert WILCOXON(values) == pytest.approx(expected, rel=1e-12)


def test_wilcoxon_is_undefined_without_a_nonzero_difference():
    assert WILCOXON([0, 0, 0]) is None
    assert WILCOXON([]) is None
    assert WILCOXON(np.zeros(5)) is None


def test_judge_and_bias_statistics_agree():
    judge = pytest.importorskip("jmllm.judge.stats")
    bias = pytest.importorskip("jmllm.bias.stats")
    x = np.random.default_rng(9).integers(-3, 4, size=60)
    assert judge.bootstrap_ci(x, level=0.9, seed=4) == bias.bootstrap_ci(x, 0.9, seed=4)
    for v in (x, np.zeros(4), []):
        assert judge.wilcoxon_p(v) == bias.wilcoxon_p(v)
