"""The toy scenes: deterministic, non-overlapping, and their truth agrees with the pixels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from jmllm.joint.toy.scenes import (
    COLOURS,
    HALLUCINATION_QUESTION,
    IMAGE_SIZE,
    SHAPES,
    ToyObject,
    caption_correct,
    caption_objects,
    iter_scenes,
    make_scene,
    normalise_answer,
    scene_caption,
    scene_from_record,
    scenes_dataset,
)

SCENES = list(iter_scenes("train", 60, seed=3)) + list(iter_scenes("heldout", 60, seed=3))


def test_same_seed_same_scene_and_splits_differ():
    a, b = make_scene("train", 7, seed=1), make_scene("train", 7, seed=1)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
    assert make_scene("train", 7, seed=2).image.tobytes() != a.image.tobytes()
    # the held-out split is another random stream: no image of one split appears in the other
    train = {s.image.tobytes() for s in iter_scenes("train", 50)}
    heldout = {s.image.tobytes() for s in iter_scenes("heldout", 50)}
    assert not train & heldout
    with pytest.raises(ValueError, match="split"):
        make_scene("test", 0)


def test_objects_fit_do_not_overlap_and_names_are_unique():
    for scene in SCENES:
        assert scene.image.size == (IMAGE_SIZE, IMAGE_SIZE) and scene.image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 3
        assert len(set(scene.labels)) == len(scene.labels)
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            for b in scene.objects[i + 1 :]:
                overlap_x = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                overlap_y = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert overlap_x <= 0 or overlap_y <= 0, (scene.index, a, b)
    # variety: every shape, colour, background and object count occurs
    objects = [o for s in SCENES for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {s.background for s in SCENES} == {"plain", "gradient", "texture"}
    assert {len(s.objects) for s in SCENES} == {1, 2, 3}
    sides = [o.box[2] - o.box[0] for o in objects]
    assert max(sides) - min(sides) >= 15


def _object_pixels(image) -> np.ndarray:
    """Pixels whose channels differ by more than 60 grey levels: saturated, i.e. objects.

    Backgrounds are neutral (channels within ~20 of each other), object colours differ by >= 100.
    """
    rgb = np.asarray(image, dtype=np.int32)
    return (rgb.max(-1) - rgb.min(-1)) > 60


def test_truth_agrees_with_the_pixels():
    """Found independently from the pixels: each object is one connected saturated region whose
    tight box is the true box, whose colour is nearest the true colour's, and whose silhouette
    is the true shape's."""
    for scene in SCENES:
        rgb = np.asarray(scene.image, dtype=np.float32)
        labels, count = ndimage.label(_object_pixels(scene.image), structure=np.ones((3, 3)))
        assert count == len(scene.objects), scene.index
        found = {}
        for region, slc in enumerate(ndimage.find_objects(labels), start=1):
            box = (slc[1].start, slc[0].start, slc[1].stop, slc[0].stop)
            mask = labels[slc] == region
            found[box] = (rgb[slc][mask].mean(0), mask)
        assert set(found) == {o.box for o in scene.objects}, scene.index
        for o in scene.objects:
            mean, mask = found[o.box]
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
            assert nearest == o.colour
            assert _silhouette(mask) == o.shape, (scene.index, o)


def _silhouette(mask: np.ndarray) -> str:
    """The shape of a tight (H, W) mask, from simple facts about each silhouette."""
    h, w = mask.shape
    corners = [mask[0, 0], mask[0, -1], mask[-1, 0], mask[-1, -1]]
    if mask.mean() > 0.97:
        return "square"
    if mask[-1].mean() > 0.8 and mask[0].mean() < 0.35:
        return "triangle"  # a full base, a narrow apex
    if not any(corners) and mask[h // 2].all() and mask[:, w // 2].all():
        # a plus sign's vertical arm is as wide at its end as further in; a circle widens
        return "cross" if mask[0].sum() == mask[h // 4].sum() else "circle"
    return "unknown"


def test_caption_is_left_to_right_and_questions_are_consistent():
    for scene in SCENES:
        xs = [o.centre[0] for o in scene.objects]
        assert xs == sorted(xs)
        assert caption_correct(scene.caption, scene.objects)
        assert [f"{c} {s}" for c, s in caption_objects(scene.caption)] == scene.labels
        shapes = Counter(o.shape for o in scene.objects)
        qa = {q.question: q.answer for q in scene.questions}
        assert qa["How many objects are there?"] == ["one", "two", "three"][len(scene.objects) - 1]
        assert qa["What's in the image?"] == f"The image shows {scene.caption}."
        for shape in SHAPES:
            truth = "yes" if shapes[shape] else "no"
            assert qa[f"Is there a {shape}?"] == truth
            assert qa[HALLUCINATION_QUESTION.format(shape)] == truth
            # colour questions only where the answer is unambiguous
            key = f"What colour is the {shape}?"
            if shapes[shape] == 1:
                assert qa[key] == next(o.colour for o in scene.objects if o.shape == shape)
            else:
                assert key not in qa


def test_caption_wording_and_parsing():
    objs = [
        ToyObject("circle", "red", (0, 0, 5, 5)),
        ToyObject("square", "blue", (10, 0, 15, 5)),
        ToyObject("cross", "green", (20, 0, 25, 5)),
    ]
    assert scene_caption(objs[:1]) == "a red circle"
    assert scene_caption(objs[:2]) == "a red circle and a blue square"
    assert scene_caption(objs) == "a red circle, a blue square and a green cross"
    assert caption_correct("The image shows a green cross, a blue square and a red circle.", objs)
    assert not caption_correct("a red circle and a blue square", objs)  # one missing
    assert not caption_correct("a red circle, a blue square, a green cross and a red cross", objs)
    assert not caption_correct("a red circle, a red circle and a blue square", objs[:2])  # repeat
    assert not caption_correct("a circle, a square and a cross", objs)  # colours are required
    assert caption_objects("two RED circles") == Counter({("red", "circle"): 1})
    assert normalise_answer("  Three.") == "three"


def test_dataset_rows_round_trip():
    ds = scenes_dataset("heldout", 5, seed=3)
    assert len(ds) == 5 and ds.features["image"].__class__.__name__ == "Image"
    for i, row in enumerate(ds):
        scene = scene_from_record(row)
        want = make_scene("heldout", i, seed=3)
        assert scene.objects == want.objects and scene.questions == want.questions
        assert np.array_equal(np.asarray(scene.image), np.asarray(want.image))  # PNG: lossless
        assert row["objects"]["bbox"] == [list(map(float, o.box)) for o in want.objects]


def test_docstring_examples():
    import doctest

    import jmllm.joint.toy.scenes as module

    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
