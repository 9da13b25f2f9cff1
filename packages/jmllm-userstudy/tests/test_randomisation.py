from __future__ import annotations

import itertools
import json
import random

from jmllm.userstudy.randomisation import participant_order, participant_seed
from jmllm.userstudy.score import score_answers
from jmllm.userstudy.testing import write_answers

IDS = ["q1", "q2", "q3"]


def test_order_is_reproducible_from_the_seed():
    assert participant_order(IDS, 5, "P7") == participant_order(IDS, 5, "P7")
    orders = {tuple(participant_order(IDS, 5, f"P{i}")) for i in range(50)}
    assert len(orders) > 10  # different participants get different orders
    # Another study seed gives other orders to the same participant ids.
    same_ids = [f"P{i}" for i in range(20)]
    assert [participant_order(IDS, 5, p) for p in same_ids] != [
        participant_order(IDS, 6, p) for p in same_ids
    ]


def test_every_order_is_a_permutation_and_all_permutations_and_swaps_occur():
    seen_orders = set()
    swaps = {(q, s): 0 for q in IDS for s in (False, True)}
    for i in range(600):
        shown = participant_order(IDS, 2024, f"participant-{i}")
        assert [s.position for s in shown] == [1, 2, 3]
        assert sorted(s.question_id for s in shown) == IDS
        seen_orders.add(tuple(s.question_id for s in shown))
        for s in shown:
            swaps[(s.question_id, s.swapped)] += 1
    assert seen_orders == set(itertools.permutations(IDS))
    # Each question is shown swapped about half the time.
    assert all(240 <= count <= 360 for count in swaps.values()), swaps


def test_seed_depends_on_every_character_of_the_id():
    assert participant_seed(1, "P1") != participant_seed(1, "P1 ")
    assert participant_seed(1, "é") != participant_seed(1, "e")


def test_every_permutation_maps_back_to_the_spec(example_spec, tmp_path):
    """Random participants each answer a random subset correctly, through their own permuted and
    swapped questionnaire; scoring must recover exactly which ones were correct."""
    rng = random.Random(0)
    ids = [q.id for q in example_spec.questions]
    expected = dict.fromkeys(ids, 0)
    expected_per_participant = {}
    seen_swaps = set()
    for i in range(40):
        pid = f"P{i:02d}"
        correct = {q for q in ids if rng.random() < 0.5}
        for q in correct:
            expected[q] += 1
        expected_per_participant[pid] = len(correct)
        path = write_answers(example_spec, tmp_path, pid, correct)
        doc = json.loads(path.read_text())
        for entry in doc["answers"]:
            seen_swaps.add((entry["question_id"], entry["swapped"]))
            question = example_spec.question(entry["question_id"])
            # "Explanation 1" on screen is the page's first file, or its second when swapped
            on_screen_first = question.page_explanations()[1 if entry["swapped"] else 0]
            if on_screen_first != question.explanations[0]:
                # the shown choice is the spec's choice flipped
                spec_choice = {"A1": "A2", "A2": "A1"}[entry["choice"]]
            else:
                spec_choice = entry["choice"]
            assert (spec_choice == question.correct) == (question.id in correct)
    assert len(seen_swaps) == 2 * len(ids)  # every question was shown both ways
    result = score_answers(example_spec, tmp_path)
    assert result.problems == ()
    assert {q.question_id: q.rate.correct for q in result.questions} == expected
    assert all(q.rate.total == 40 for q in result.questions)
    assert {p.participant_id: p.rate.correct for p in result.participants} == {
        pid.lower(): n for pid, n in expected_per_participant.items()
    }
