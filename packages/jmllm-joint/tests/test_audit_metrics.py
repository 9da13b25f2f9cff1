"""Metrics of the hallucination audit against hand-worked cases and straightforward counts."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from jmllm.joint.audit import AuditRecord, parse_answer
from jmllm.joint.audit.metrics import (
    Confusion,
    audit_metrics,
    auroc,
    bootstrap_pope,
    per_class,
    pope_metrics,
)


def _record(image: str, cls: str, present: bool, answer: str, score: float) -> AuditRecord:
    """A record whose raw reply is its answer text (nothing around it to strip)."""
    return AuditRecord(image, f"{image}.jpg", cls, present, answer, (), True, score, answer)


# --------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "finished", "authors", "strict", "pope"),
    [
        ("Yes", True, "yes", "yes", "yes"),
        ("No", True, "no", "no", "no"),
        ("yes", True, "other", "yes", "yes"),
        ("No.", True, "other", "no", "no"),
        ("YES!", True, "other", "yes", "yes"),
        ("Yes", False, "other", "other", "yes"),  # cut by the token limit: unknown
        ("Yes, there is a cat.", True, "other", "other", "yes"),
        ("There is no cat in the image.", True, "other", "other", "no"),
        ("I do not see one.", True, "other", "other", "no"),
        ("I don't see one.", True, "other", "other", "yes"),  # POPE's rule guesses: no 'no' word
        ("It is not there", True, "other", "other", "no"),
        ("Nope", True, "other", "other", "yes"),
        ("", True, "other", "other", "yes"),
        ("Yes no", True, "other", "other", "no"),
        # the authors compare the raw text after "ASSISTANT: ": nothing is stripped
        (" Yes", True, "other", "yes", "yes"),
        ("No\n", True, "other", "no", "yes"),  # POPE splits on " " only: no word "No" here
        (None, True, "other", "other", "yes"),  # their split found no reply at all
    ],
)
def test_parse_rules(text, finished, authors, strict, pope) -> None:
    assert parse_answer(text, finished, "authors") == authors
    assert parse_answer(text, finished, "strict") == strict
    assert parse_answer(text, finished, "pope") == pope


def test_records_read_the_raw_reply_under_the_authors_rule() -> None:
    stripped = AuditRecord("a", "a.jpg", "cat", True, "Yes", (1,), True, 0.5, reply=" Yes")
    assert stripped.parsed("authors") == "other"  # " Yes": the notebook skipped it
    assert stripped.parsed("strict") == stripped.parsed("pope") == "yes"
    exact = AuditRecord("a", "a.jpg", "cat", True, "Yes", (1,), True, 0.5, reply="Yes")
    assert exact.parsed("authors") == "yes"
    none = AuditRecord("a", "a.jpg", "cat", True, "Yes", (1,), True, 0.5, reply=None)
    assert none.parsed("authors") == "other" and none.parsed("strict") == "yes"


def test_unknown_parse_rule_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="parse rule: 'lenient'"):
        parse_answer("Yes", rule="lenient")


# --------------------------------------------------------------------------------- POPE
def test_pope_metrics_hand_worked() -> None:
    # TP 3, FP 1, TN 4, FN 2 → acc 7/10, precision 3/4, recall 3/5, F1 6/9, yes-ratio 4/10
    m = Confusion(tp=3, fp=1, tn=4, fn=2).metrics()
    assert m == pytest.approx(
        {"accuracy": 0.7, "precision": 0.75, "recall": 0.6, "f1": 6 / 9, "yes_ratio": 0.4}
    )
    # F1 equals the harmonic mean of precision and recall
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))


def test_undefined_ratios_are_none_not_zero() -> None:
    m = Confusion(tp=0, fp=0, tn=5, fn=0).metrics()  # J never says yes, nothing present
    assert m["accuracy"] == 1.0 and m["yes_ratio"] == 0.0
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None
    m = Confusion(tp=0, fp=2, tn=0, fn=3).metrics()
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert all(v is None for v in Confusion().metrics().values())


def test_pope_metrics_vectorised_equals_scalar() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(50, 4))
    arrays = pope_metrics(*counts.T)
    for i, row in enumerate(counts):
        scalar = pope_metrics(*row)
        for a, s in zip(arrays, scalar, strict=True):
            assert (s is None and math.isnan(a[i])) or a[i] == pytest.approx(s)


# --------------------------------------------------------------------------------- AUROC
def _pairwise_auroc(scores, labels) -> float:
    """The definition, counted pair by pair: P(score of a positive > score of a negative),
    ties one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pairwise_count(seed) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    scores = np.round(rng.uniform(size=n), 1)  # rounding makes ties
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False
    assert auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_hand_worked_and_edge_cases() -> None:
    assert auroc([0.9, 0.8, 0.3, 0.1], [True, False, True, False]) == 0.75
    assert auroc([0.9, 0.8], [True, False]) == 1.0
    assert auroc([0.1, 0.8], [True, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5, 0.7], [True, True]) is None
    assert auroc([], []) is None


# --------------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    per_image = rng.integers(0, 5, size=(40, 4))
    a = bootstrap_pope(per_image, n_resamples=500, seed=3)
    b = bootstrap_pope(per_image, n_resamples=500, seed=3)
    c = bootstrap_pope(per_image, n_resamples=500, seed=4)
    assert a.intervals == b.intervals and a.intervals != c.intervals
    point = Confusion(*(int(v) for v in per_image.sum(0))).metrics()
    for name, (low, high) in a.intervals.items():
        assert low <= point[name] <= high, name
        assert high - low < 0.5


def test_bootstrap_resamples_images_not_questions() -> None:
    # every image alike: any resample of images gives the same metrics → a zero-width interval
    same = np.tile([[2, 1, 3, 1]], (10, 1))
    b = bootstrap_pope(same, n_resamples=200)
    for low, high in b.intervals.values():
        assert low == pytest.approx(high)
    # two kinds of image: all-correct and all-wrong; the interval of accuracy spans both sides
    mixed = np.array([[3, 0, 3, 0]] * 10 + [[0, 3, 0, 3]] * 10)
    low, high = bootstrap_pope(mixed, n_resamples=500).intervals["accuracy"]
    assert low < 0.5 < high and high - low > 0.2


def test_bootstrap_reports_undefined_resamples_and_small_samples() -> None:
    # precision undefined in resamples that drew only the image without any "yes"
    counts = np.array([[1, 0, 0, 0], [0, 0, 1, 0]])
    b = bootstrap_pope(counts, n_resamples=400, seed=0)
    assert 0 < b.undefined["precision"] < 400
    assert b.intervals["precision"] == (1.0, 1.0)
    assert bootstrap_pope(np.array([[1, 0, 1, 0]])).intervals["accuracy"] is None


# --------------------------------------------------------------------------------- the audit's numbers
def test_audit_metrics_hand_worked() -> None:
    records = [
        _record("a", "cat", True, "Yes", 0.9),  # TP
        _record("a", "dog", False, "No", 0.1),  # TN
        _record("a", "car", False, "Yes", 0.6),  # FP: positive hallucination
        _record("b", "cat", True, "No", 0.3),  # FN: negative hallucination
        _record("b", "dog", False, "Maybe", 0.5),  # unparsed
        _record("b", "car", False, "No", 0.2),  # TN
    ]
    m = audit_metrics(records, n_resamples=100)
    assert m["questions"] == 6 and m["unparsed"] == 1 and m["images"] == 2
    assert (m["pope"]["tp"], m["pope"]["fp"], m["pope"]["tn"], m["pope"]["fn"]) == (1, 1, 2, 1)
    assert m["pope"]["accuracy"] == pytest.approx(3 / 5)
    assert m["pope"]["precision"] == pytest.approx(1 / 2)
    assert m["pope"]["recall"] == pytest.approx(1 / 2)
    assert m["pope"]["f1"] == pytest.approx(1 / 2)
    assert m["pope"]["yes_ratio"] == pytest.approx(2 / 5)
    conf = m["owl_confidence"]
    assert conf == pytest.approx(
        {"yes_present": 0.9, "no_present": 0.3, "yes_absent": 0.6, "no_absent": 0.15}
    )
    # yes: 0.9, 0.6; no: 0.1, 0.3, 0.2 → every yes above every no
    assert m["auroc_owl_predicts_yes"] == 1.0
    assert m["auroc_owl_predicts_yes_present"] == 1.0
    assert m["auroc_owl_predicts_yes_absent"] == 1.0
    rows = {r["class"]: r for r in m["per_class"]}
    assert rows["car"]["hallucination_rate"] == 0.5 and rows["car"]["recall"] is None
    assert rows["cat"]["recall"] == 0.5 and rows["dog"]["unparsed"] == 1
    assert rows["dog"]["hallucination_rate"] == 0.0
    assert rows["dog"]["mean_owl_absent"] == pytest.approx(0.3)  # unparsed scores count here
    # another parse rule changes what is counted
    assert audit_metrics(records, rule="pope", n_resamples=100)["unparsed"] == 0


def test_per_class_rows_sorted_by_hallucination_rate() -> None:
    R = SimpleNamespace
    rows = per_class(
        [
            (R(class_name="a", present=False, owl_score=0.1), "no"),
            (R(class_name="b", present=False, owl_score=0.2), "yes"),
            (R(class_name="b", present=True, owl_score=0.7), "yes"),
        ]
    )
    assert [r["class"] for r in rows] == ["b", "a"]
    assert rows[0]["recall"] == 1.0 and rows[0]["present_questions"] == 1
