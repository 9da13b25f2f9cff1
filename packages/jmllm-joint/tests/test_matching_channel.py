"""GA's default class channel follows the explained word (``matching``), and the toy world's
default-path figures are computed as documented."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jmllm.joint.saliency import matching_query
from jmllm.joint.toy.default_path import named_objects, scene_interval
from jmllm.joint.toy.scenes import make_scene

SHAPES = ["circle", "square", "triangle", "cross"]


def _by_word(text: str, queries: list[str]) -> dict[str, tuple[int | None, str]]:
    out = {}
    for m in re.finditer(r"\w+", text):
        match = matching_query(text, m.start(), m.end(), queries)
        out.setdefault(m.group(), (match.index, match.rule))
    return out


def test_a_word_refers_to_its_noun_phrases_head():
    got = _by_word("a blue triangle, a red cross and a green cross", SHAPES)
    assert got["blue"] == (2, "phrase head 'triangle'")
    assert got["triangle"] == (2, "phrase head 'triangle'")
    assert got["red"] == (3, "phrase head 'cross'")
    assert got["a"] == (2, "phrase head 'triangle'")  # the first "a": its phrase's head
    assert got["and"][0] is None and "maximum" in got["and"][1]


def test_phrases_end_at_punctuation_conjunctions_prepositions_and_verbs():
    got = _by_word("The image shows two crosses and a red circle on a table.", SHAPES)
    assert got["The"][0] is None and got["image"][0] is None  # "shows" ends the phrase
    assert got["shows"][0] is None
    assert got["two"] == (3, "phrase head 'crosses'")  # plural to the query's singular
    assert got["table"][0] is None  # no query names it
    got = _by_word("a red, round circle", SHAPES)
    assert got["red"][0] is None  # the comma ends "a red"


def test_queries_sharing_a_head_prefer_the_one_the_phrase_spells_out():
    queries = ["red cross", "green cross", "cross"]
    got = _by_word("a green cross and two crosses", queries)
    assert got["green"][0] == 1 and got["cross"][0] == 1
    assert got["two"][0] == 2 and got["crosses"][0] == 2  # "red"/"green" are not in its phrase
    # the most specific of the queries the phrase spells out, whatever their order: "cross" is
    # in "a green cross" too, but "green cross" names it more closely
    got = _by_word("a green cross and two crosses", ["cross", "green cross", "red cross"])
    assert got["green"][0] == 1 and got["cross"][0] == 1
    assert got["two"][0] == 0 and got["crosses"][0] == 0


def test_a_query_containing_the_word_is_the_second_rule():
    text = "it is red"
    match = matching_query(text, text.index("red"), len(text), ["blue square", "red circle"])
    assert (match.index, match.rule) == (1, "query contains 'red'")


def test_one_query_is_always_that_query():
    """The authors' single-query scripts: every mode is the one query, whatever the word."""
    text = "The image shows a bird"
    for start, end in ((0, 3), (4, 9), (18, 22)):
        assert matching_query(text, start, end, ["bird"]).index == 0


def test_named_objects_pairs_colour_and_shape_words_of_the_scene():
    scene = make_scene("heldout", 103)  # a blue triangle, a red cross and a green cross
    text = "a blue triangle, a yellow cross and a green cross"
    assert [(c, s, o.name) for c, s, o in named_objects(text, scene)] == [
        (1, 2, "blue triangle"),
        (8, 9, "green cross"),  # the yellow cross is not in the scene: no truth to score
    ]


def test_scene_interval_is_the_percentile_bootstrap_of_resampled_scenes():
    """Against a straightforward loop: resample scenes with replacement, sum, take the
    statistic, then the 2.5 and 97.5 percentiles (same seed and draws as scipy's)."""
    rng = np.random.default_rng(3)
    per_scene = np.stack([rng.integers(0, 3, 40), np.full(40, 2)], axis=1).astype(float)
    low, high = scene_interval(per_scene, lambda s: s[..., 0] / s[..., 1], n_resamples=999)
    draws = np.random.default_rng(0).integers(0, 40, size=(999, 40))
    values = [per_scene[d].sum(0)[0] / per_scene[d].sum(0)[1] for d in draws]
    want = np.percentile(values, [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(want), abs=0.02)
    point = per_scene[:, 0].sum() / per_scene[:, 1].sum()
    assert low < point < high
    assert scene_interval(per_scene[:1], lambda s: s[..., 0]) is None


def test_default_path_words_are_explain_answers_words(tiny_joint):
    """The benchmark explains only the words it scores (one backward per word); each result is
    the one ``GradientAlignment.explain_answer`` — the CLI's path — gives for that word."""
    import torch

    from jmllm.joint.saliency import GradientAlignment
    from jmllm.joint.toy.default_path import _word_results

    ga = GradientAlignment(tiny_joint)
    scene = make_scene("heldout", 3)
    emb = tiny_joint.embed([scene.image])
    answer = tiny_joint.generate(emb, "What's the content of the image?", max_new_tokens=6)[0]
    queries = SHAPES
    exp = ga.explain_answer(emb, "What's the content of the image?", queries, answer=answer)
    assert len(exp.word_results) >= 2
    picked = [len(exp.word_results) - 1, 0]
    for index, result in zip(picked, _word_results(ga, emb, answer, picked), strict=True):
        want = exp.word_results[index]
        assert result.target == want.target and result.class_match == want.class_match
        assert torch.allclose(result.similarities, want.similarities, atol=1e-6)
        assert np.allclose(result.shown("class"), want.shown("class"), atol=1e-5)
