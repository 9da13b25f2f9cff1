"""Hallucination view: object mentions, detection in the same t, GA per mention, the report."""

from __future__ import annotations

import json
import re

import torch

from jmllm.joint.cli import main
from jmllm.joint.hallucination import (
    check_hallucinations,
    object_mentions,
    write_hallucination_report,
)

QUESTION = "What's in the image?"
ANSWER = "The cat is sitting on the couch near two dogs and a teddy bear"


def test_object_mentions_rule():
    found = object_mentions(ANSWER)
    assert [(m.name, m.text) for m in found] == [
        ("cat", "cat"),
        ("couch", "couch"),
        ("dog", "dogs"),
        ("teddy bear", "teddy bear"),
    ]
    assert [m.name for m in object_mentions("Three people and a bus.")] == ["person", "bus"]
    assert [m.name for m in object_mentions("A catalogue.")] == []  # whole words only
    assert [m.name for m in object_mentions("red curtains", ["curtain"])] == ["curtain"]


def test_check_uses_the_same_t(tiny_joint, sample_images):
    emb = tiny_joint.embed(sample_images[:1])
    report = check_hallucinations(
        tiny_joint, emb, QUESTION, answer=ANSWER, extra_queries=["horse"], threshold=0.5
    )
    names = ["cat", "couch", "dog", "teddy bear", "horse"]
    assert list(report.objects) == names
    # scores are O^OWL's on this very embedding
    logits, _ = tiny_joint.detection_heads(emb.t, tiny_joint.encode_queries(names))
    best = torch.sigmoid(logits[0]).max(0).values
    for i, name in enumerate(names):
        assert abs(report.objects[name].score - float(best[i])) < 1e-5
        assert report.objects[name].detected == (float(best[i]) >= 0.5)
    assert set(report.mentioned_not_detected) == {
        n for n in names[:4] if not report.objects[n].detected
    }
    assert report.detected_not_mentioned == (["horse"] if report.objects["horse"].detected else [])
    assert report.objects["horse"].ga is None
    ga = report.objects["dog"].ga
    assert ga is not None and ga.target == "dogs" and ga.queries == names


def test_report_highlights_and_is_self_contained(tiny_joint, sample_images, tmp_path):
    report = check_hallucinations(
        tiny_joint, sample_images[0], "<i>" + QUESTION, answer=ANSWER, threshold=0.5
    )
    path = write_hallucination_report(report, tmp_path)
    text = path.read_text()
    for ref in re.findall(r"(?:src|href)\s*=\s*['\"]([^'\"]*)", text):
        assert ref.startswith("data:")
    assert "<i>" not in text and "&lt;i&gt;" in text
    misses = text.count("class='w miss'")
    hits = text.count("class='w hit'")
    assert misses + hits == 4 and misses == len(report.mentioned_not_detected)
    saved = json.loads((tmp_path / "hallucinations.json").read_text())
    assert saved["mentioned_not_detected"] == report.mentioned_not_detected


def test_cli_hallucinations(tmp_path, capsys):
    """On the built-in (toy) models: an answer that names an absent shape is flagged, and the
    vocabulary is the toy shapes."""
    from jmllm.joint.toy.scenes import make_scene

    scene = make_scene("heldout", 2)  # a green square, alone
    assert [o.name for o in scene.objects] == ["green square"]
    image = tmp_path / "img.png"
    scene.image.save(image)
    answer = "The image shows a green square and a red circle"
    argv = ["hallucinations", str(image), "--tiny", "-p", QUESTION, "--answer", answer]
    rc = main([*argv, "--threshold", "0.5", "--out", str(tmp_path / "h")])
    out = capsys.readouterr().out
    assert rc == 0
    flagged = next(
        line for line in out.splitlines() if line.startswith("Mentioned but not detected:")
    )
    assert "circle" in flagged and "square" not in flagged
    assert (tmp_path / "h" / "hallucinations.html").is_file()


def test_extra_queries_the_answer_mentions_are_mentions(tiny_joint, sample_images):
    """An extra query (-q) that the answer itself names, in any case or number, is a mention:
    never reported as detected-but-not-mentioned (threshold 0: every query is detected)."""
    answer = "Two Houses stand near a tree, a car and three dogs"
    report = check_hallucinations(
        tiny_joint,
        sample_images[0],
        QUESTION,
        answer=answer,
        extra_queries=["house", "Tree", "dog", " car ", "horse"],
        threshold=0.0,
    )
    assert report.detected_not_mentioned == ["horse"]
    assert [m.text for m in report.mentions] == ["Houses", "tree", "car", "dogs"]
    for name in ("house", "tree", "car", "dog"):
        check = report.objects[name]
        assert check.mentioned and check.ga is not None, name
    assert report.mentioned_not_detected == []
