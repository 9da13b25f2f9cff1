"""Are the explanations right? GA, its sanity checks and the hallucination view on the toy world.

The shipped toy J is scored on a few held-out scenes (beyond those the manifest and the
benchmark use) with thresholds looser than the benchmark's targets: a few scenes are noisy, but
a GA that points at the wrong object, a sanity check that does not randomise anything, or a
hallucination view with its verdicts inverted fails them. ``benchmarks/toy_validity.py``
measures the same on more scenes.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from jmllm.joint.hallucination import check_hallucinations
from jmllm.joint.toy.localisation import (
    ga_localisation,
    peak_in_box,
    randomisation_cascade,
    reinitialised,
)
from jmllm.joint.toy.scenes import IN_IMAGE_PREFIX, IN_IMAGE_QUESTION, SHAPES, make_scene
from jmllm.joint.toy.validity import absent_word_check, hallucination_check, score_auroc

START = 7000  # held-out scenes used by no other check
SCENES = 6


@pytest.fixture(scope="module")
def toy(toy_joint):
    return toy_joint  # the session's one toy J (conftest)


@pytest.fixture(scope="module")
def localisation(toy):
    return ga_localisation(toy, scenes=SCENES, start=START, cascade=True)


def test_ga_localises_named_objects_better_than_random(localisation):
    scores = localisation["caption"]["all"]
    assert scores["objects"] >= 6, scores
    for iou in ("maxboxacc_iou30", "maxboxacc_iou50"):
        acc = scores[iou]
        assert acc["ga"] >= acc["random"] + 0.25, (iou, acc)
    assert scores["pointing"]["ga"] >= 0.5, scores["pointing"]
    # every figure is a fraction
    for key in ("maxboxacc_iou30", "maxboxacc_iou50", "maxboxacc_iou70", "pointing"):
        assert all(0.0 <= v <= 1.0 for v in scores[key].values()), scores[key]


def test_randomising_lowers_the_correlation(localisation):
    """Adebayo et al.: maps of a model whose W (then LLM layers) are destroyed differ."""
    assert localisation["sanity_spearman_reinit_w"] < 0.9
    cascade = localisation["cascade"]
    assert [c["stage"] for c in cascade] == [
        "trained", "w", "head", "layer_2", "layer_1", "layer_0",
    ]  # fmt: skip
    assert cascade[0]["spearman"] == 1.0
    assert all(c["spearman"] < 0.9 for c in cascade[1:]), cascade


def test_cascade_randomises_cumulatively_and_leaves_the_model_alone(toy):
    before = {k: v.clone() for k, v in toy.llava.state_dict().items()}
    w_before = {k: v.clone() for k, v in toy.alignment.state_dict().items()}
    stages = dict(randomisation_cascade(toy, seed=3))
    for key, value in toy.llava.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in toy.alignment.state_dict().items():
        assert torch.equal(value, w_before[key]), key

    def changed(model, prefix):
        return not torch.equal(
            model.llava.get_submodule(prefix).weight, toy.llava.get_submodule(prefix).weight
        )

    head, top, bottom = (
        "lm_head",
        "model.language_model.layers.2.mlp.up_proj",
        ("model.language_model.layers.0.self_attn.q_proj"),
    )
    assert stages["w"].llava is toy.llava  # only W differs at the first stage
    assert not torch.equal(
        next(stages["w"].alignment.parameters()), next(toy.alignment.parameters())
    )
    assert changed(stages["head"], head) and not changed(stages["head"], top)
    assert changed(stages["layer_2"], head) and changed(stages["layer_2"], top)
    assert not changed(stages["layer_2"], bottom)
    assert changed(stages["layer_0"], bottom) and changed(stages["layer_0"], head)
    # OWL-ViT is shared, never randomised: GA's OWL side stays comparable
    assert all(m.owl is toy.owl for m in stages.values())
    # the same seed gives the same W
    again = reinitialised(toy, 3)
    assert torch.equal(next(again.alignment.parameters()), next(stages["w"].alignment.parameters()))


def test_absent_object_is_flagged_by_the_hallucination_view(toy):
    report = hallucination_check(toy, scenes=4, start=START)
    assert report["absent_mentions"] == 4 and report["present_mentions"] >= 4, report
    # the detector scores present objects above absent ones, so the view can tell them apart
    assert report["auroc"] >= 0.9, report
    assert report["mean_score_present"] > report["mean_score_absent"] + 0.3, report
    assert report["recall"] >= 0.5 and report["false_flag_rate"] <= 0.25, report


def test_view_flags_the_absent_not_the_present(toy):
    """One clear scene (one yellow cross, detected at 0.96), one teacher-forced answer: only
    the absent shape is 'mentioned, not detected' at the view's default threshold. (Not every
    scene is this clear: in scene 7000, three green objects, the detector gives an absent
    square 0.21, so the view misses it; the aggregate test above and the benchmark count such
    cases.)"""
    scene = make_scene("heldout", START + 1)
    obj = scene.objects[0]
    absent = next(s for s in SHAPES if s not in {o.shape for o in scene.objects})
    answer = f"{IN_IMAGE_PREFIX}a {obj.name} and a {obj.colour} {absent}."
    report = check_hallucinations(
        toy, scene.image, IN_IMAGE_QUESTION, answer=answer, objects=SHAPES
    )
    assert report.mentioned_not_detected == [absent], report.to_json()
    assert report.objects[obj.shape].detected and report.objects[obj.shape].mentioned
    assert report.objects[absent].ga is not None  # the view still explains the absent word
    json.dumps(report.to_json())


def test_absent_word_has_no_detection_to_lean_on(toy):
    report = absent_word_check(toy, scenes=3, start=START)
    assert report["present"]["detection_score"] > report["absent"]["detection_score"] + 0.3
    for kind in ("absent", "present"):
        assert 0.0 <= report[kind]["map_mass_on_objects"] <= 1.0


def test_score_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, rng.integers(1, 8)).tolist()  # integers: many ties
        b = rng.integers(0, 5, rng.integers(1, 8)).tolist()
        pairs = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in itertools.product(a, b)]
        assert score_auroc(a, b) == pytest.approx(np.mean(pairs))
    assert np.isnan(score_auroc([], [1.0]))


def test_peak_in_box_matches_a_direct_reading():
    rng = np.random.default_rng(1)
    for _ in range(50):
        m = np.zeros((16, 16))
        y, x = rng.integers(0, 16, 2)
        m[y, x] = 1.0  # one maximal pixel: its centre is (x + 0.5, y + 0.5)
        box = tuple(int(v) for v in (*np.sort(rng.integers(0, 17, 2)),))
        x0, x1 = box
        y0, y1 = sorted(rng.integers(0, 17, 2))
        expected = x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1
        assert peak_in_box(m, (x0, y0, x1, y1)) == expected


def test_docstring_examples():
    import doctest

    import jmllm.joint.toy.localisation as localisation_module
    import jmllm.joint.toy.validity as validity_module

    for module in (localisation_module, validity_module):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module


# ------------------------------------------------------------------ the default path, 50 scenes
DEFAULT_PATH_SCENES = range(START, START + 50)


@pytest.fixture(scope="module")
def default_path(toy):
    """GA exactly as ``explain``, the demo and the explorer run it (J's caption, the four shape
    queries, the ``matching`` channel, the shown maps) on 50 held-out scenes."""
    from jmllm.joint.toy.default_path import default_path_items, default_path_scores

    items, counts = default_path_items(toy, list(DEFAULT_PATH_SCENES))
    return default_path_scores(items, list(DEFAULT_PATH_SCENES), counts)


def test_default_path_points_at_the_named_objects(default_path):
    """Floors under what docs/toy.md measures on 300 scenes (object words: pointing 0.73,
    MaxBoxAccV2 at IoU 0.5 0.85; one-object scenes 0.97; measured on these 50: 0.67, 0.89,
    0.94; colour words 0.54): a default that took another object's channel, or maps drawn on
    another scale, falls below them. The 0.95 pointing target is missed on scenes of several objects
    (docs/toy.md says why), so it is not asserted."""
    objects = default_path["object"]
    assert objects["all"]["items"] >= 80
    at50 = {m: r["value"] for m, r in objects["all"]["maxboxacc_iou50"].items()}
    pointing = {m: r["value"] for m, r in objects["all"]["pointing"].items()}
    assert pointing["ga"] >= 0.55 and objects["single_object"]["pointing"]["ga"]["value"] >= 0.75
    assert at50["ga"] >= 0.8, at50  # the target
    for baseline in ("gradient", "stock_gradient", "random_boxes", "random"):
        assert at50["ga"] >= at50[baseline] + 0.2, (baseline, at50)
        assert pointing["ga"] > pointing[baseline], (baseline, pointing)
    assert default_path["colour"]["all"]["pointing"]["ga"]["value"] >= 0.5


def test_every_word_of_the_demos_answer_points_at_its_object(toy):
    """The demo's answer (held-out scene 114: a yellow triangle and a green cross), explained as
    the demo explains it (``explain_answer`` with every shape query, GA's defaults): every shape
    word's class map uses its own shape's channel, and every object word's and colour word's
    map peaks inside its object's true box."""
    from jmllm.joint.cli.common import TOY_DEMO_QUERIES, TOY_DEMO_QUESTIONS, TOY_DEMO_SCENE
    from jmllm.joint.saliency import GradientAlignment
    from jmllm.joint.toy.default_path import named_objects

    scene = make_scene(*TOY_DEMO_SCENE)
    emb = toy.embed([scene.image])
    answer = toy.generate(emb, TOY_DEMO_QUESTIONS[0])[0]  # as the demo
    assert answer.text == scene.caption
    exp = GradientAlignment(toy).explain_answer(
        emb, TOY_DEMO_QUESTIONS[0], list(TOY_DEMO_QUERIES), answer=answer
    )
    named = named_objects(answer.text, scene)
    assert len(named) == len(scene.objects) == 2
    peaks = {}
    for colour_word, shape_word, obj in named:
        shape = exp.word_results[shape_word]
        assert shape.class_match is not None
        assert shape.class_match.index == TOY_DEMO_QUERIES.index(obj.shape), obj.name
        for word in (colour_word, shape_word):
            shown = exp.word_results[word].shown("class")
            peaks[exp.words[word].text] = [
                o.name for o in scene.objects if peak_in_box(shown, o.box)
            ]
    assert peaks == {
        "yellow": ["yellow triangle"],
        "triangle": ["yellow triangle"],
        "green": ["green cross"],
        "cross": ["green cross"],
    }
