"""CHAIR (jmllm.joint.audit.chair): the shipped synonym list is chair.py's, captions are read by its
rules (plurals, two-word phrases, the special cases), and CHAIR_s, CHAIR_i and recall match
numbers worked out by hand on crafted captions."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

from jmllm.joint.audit.chair import (
    ChairVocabulary,
    chair_intervals,
    chair_metrics,
    coco_vocabulary,
    image_truth,
    load_reference_captions,
    sample_images,
    score_caption,
)
from jmllm.joint.audit.data import AuditError
from jmllm.joint.hallucination import COCO_OBJECTS

# SHA-256 of LisaAnne/Hallucination's data/synonyms.txt (commit d0e65fe), the list chair.py reads
STANDARD_SHA256 = "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"


@pytest.fixture(scope="module")
def vocab() -> ChairVocabulary:
    return coco_vocabulary()


def test_shipped_list_is_chair_py_s_byte_for_byte_with_its_citation():
    text = resources.files("jmllm.joint").joinpath("data", "chair_synonyms.txt").read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert hashlib.sha256(body.encode()).hexdigest() == STANDARD_SHA256
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "Rohrbach" in header and "EMNLP 2018" in header and "BSD 2-Clause" in header


def test_standard_vocabulary_is_the_80_coco_categories(vocab):
    assert vocab.categories == COCO_OBJECTS
    assert vocab.coco_rules
    assert vocab.synonyms["kitten"] == "cat" and vocab.synonyms["sofa"] == "couch"


def _words(vocab, caption):
    return [(m.word, m.category) for m in vocab.mentions(caption)]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two dogs and three puppies.", [("dog", "dog"), ("puppy", "dog")]),
        ("Women and men with children.", [("woman", "person"), ("man", "person"),
                                         ("children", "person")]),
        ("People eat hot dogs.", [("people", "person"), ("hot dog", "hot dog")]),
        ("A teddy bear, not a bear.", [("teddy bear", "teddy bear"), ("bear", "bear")]),
        ("Knives and wine glasses.", [("knive", "knife"), ("wine glass", "wine glass")]),
        ("A baby elephant and an adult giraffe.", [("elephant", "elephant"),
                                                   ("giraffe", "giraffe")]),
        ("The baby cries.", [("baby", "person")]),  # without an animal after it: a person
        ("A passenger jet lands.", [("jet", "airplane")]),  # not a person
        ("A man in a bow tie.", [("man", "person"), ("tie", "tie")]),
        ("The seat of the toilet.", [("toilet", "toilet")]),  # seat dropped with a toilet
        ("A seat by the window.", [("seat", "chair")]),
        ("Train tracks by the road.", []),  # "train track" is no train
        ("A motor bike and a motor cycle.", [("motor cycle", "motorcycle")]),  # list quirk
        ("Buses, benches and skis.", [("bus", "bus"), ("bench", "bench"), ("skis", "skis")]),
        ("A glass of grass.", []),
        ("The dog's bowls.", [("dog", "dog"), ("bowl", "bowl")]),
    ],
)  # fmt: skip
def test_captions_are_read_as_chair_py_reads_them(vocab, caption, expected):
    assert _words(vocab, caption) == expected


def test_mention_spans_point_into_the_caption(vocab):
    caption = "Two Hot Dogs near a Baby Bird."
    mentions = vocab.mentions(caption)
    # a two-word phrase spans both words, whatever it is read as ("baby bird" is a bird)
    assert [caption[m.start : m.end] for m in mentions] == ["Hot Dogs", "Baby Bird"]
    assert [m.text for m in mentions] == ["Hot Dogs", "Baby Bird"]
    assert [m.word for m in mentions] == ["hot dog", "bird"]


def test_chair_metrics_by_hand(vocab):
    truth = {"1": {"dog", "person"}, "2": {"cat"}, "3": {"car", "bus"}}
    scores = [
        score_caption(vocab, "1", "A man walks two dogs past a cat.", truth["1"]),  # cat wrong
        score_caption(vocab, "2", "A kitten and a kitten.", truth["2"]),  # 2 correct mentions
        score_caption(vocab, "3", "An empty street.", truth["3"]),  # no mention
    ]
    assert [s.hallucinated for s in scores] == [[False, False, True], [False, False], []]
    m = chair_metrics(scores)
    assert m["chair_s"] == pytest.approx(1 / 3)  # one caption of three hallucinates
    assert m["chair_i"] == pytest.approx(1 / 5)  # five mentions (kitten twice), one wrong
    # recall: caption 1 covers dog, person of 2; caption 2 covers cat of 1; caption 3 none of 2
    assert m["recall"] == pytest.approx(3 / 5)
    assert (m["mentions"], m["hallucinated_mentions"], m["truth_objects"]) == (5, 1, 5)
    empty = chair_metrics([])
    assert empty["chair_s"] is None and empty["chair_i"] is None and empty["recall"] is None


def test_chair_intervals_resample_captions(vocab):
    scores = [
        score_caption(vocab, str(i), "A dog and a cat." if i % 4 == 0 else "A dog.", {"dog"})
        for i in range(40)
    ]
    point = chair_metrics(scores)
    ci = chair_intervals(scores, n_resamples=500, seed=1)
    for key in ("chair_s", "chair_i"):
        low, high = ci[key]
        assert low <= point[key] <= high and low < high
    assert ci["recall"] == [1.0, 1.0]  # every caption names its dog
    assert chair_intervals(scores, n_resamples=500, seed=1) == ci
    assert chair_intervals(scores[:1])["chair_s"] is None


def test_truth_joins_annotations_and_reference_captions(vocab):
    truth = image_truth(vocab, {"1": ["dog"], "2": []}, {"1": ["A woman and her puppy."]})
    assert truth == {"1": {"dog", "person"}, "2": set()}
    with pytest.raises(AuditError, match="'unicorn' is not in the synonym list"):
        image_truth(vocab, {"1": ["unicorn"]})


def test_a_list_of_one_s_own_reads_its_two_word_entries():
    vocab = ChairVocabulary.parse("# toy\ncircle, disc, ring\ncross, plus sign\n", name="toy")
    assert not vocab.coco_rules and vocab.categories == ("circle", "cross")
    assert _words(vocab, "Two discs and a plus sign.") == [("disc", "circle"),
                                                          ("plus sign", "cross")]  # fmt: skip
    assert _words(vocab, "A baby circle.") == [("circle", "circle")]  # no COCO special cases
    with pytest.raises(AuditError, match="no category"):
        ChairVocabulary.parse("# nothing\n", name="empty")


def test_sample_images_is_seeded_and_order_free():
    ids = [str(i) for i in range(1000)]
    first = sample_images(ids, 500, seed=0)
    assert len(first) == 500 and first == sorted(first, key=int)
    assert sample_images(list(reversed(ids)), 500, seed=0) == first  # the input order is moot
    assert sample_images(ids, 500, seed=1) != first
    assert sample_images(ids[:10], 500) == ids[:10]  # fewer images than asked: all


def test_reference_captions(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"annotations": [{"image_id": 7, "caption": "A dog."},
                                                {"image_id": 7, "caption": "A pup."}]}))  # fmt: skip
    assert load_reference_captions(path) == {"7": ["A dog.", "A pup."]}
    path.write_text(json.dumps({"annotations": [{"image_id": 7}]}))
    with pytest.raises(AuditError, match=r"annotations\[0\] needs an 'image_id' and a 'caption'"):
        load_reference_captions(path)
