"""The hallucination audit on the trained toy world, where the truth is known: J's yes/no answers
must mostly be right, and OWL-ViT's confidence on the same embedding must separate present from
absent shapes. On random models (test_audit.py) only the mechanics can be checked; here a wrong
class order, an inverted present/absent flag or OWL scores read for the wrong query fail."""

from __future__ import annotations

import json

import pytest

from jmllm.joint.audit import AuditSettings, run_audit
from jmllm.joint.audit.data import load_coco
from jmllm.joint.audit.metrics import audit_metrics
from jmllm.joint.audit.report import write_audit_report
from jmllm.joint.toy.sample_data import write_sample_data
from jmllm.joint.toy.scenes import SHAPES, make_scene

SCENES = 12
# The shipped toy LLaVA answers LLaVA-1.5's exact "Yes"/"No", which the authors' rule reads.
RULE = "authors"


@pytest.fixture(scope="module")
def toy_audit(tmp_path_factory, toy_joint):
    root = tmp_path_factory.mktemp("toy-audit")
    write_sample_data(root / "data", count=SCENES, wsol_count=1)  # held-out scenes 0..SCENES-1
    ann, images = root / "data" / "coco" / "instances.json", root / "data" / "coco" / "images"
    model = toy_joint  # the session's one toy J (conftest)
    dataset = load_coco(ann, images)
    result = run_audit(model, dataset, root / "out", AuditSettings(), progress=False)
    return model, dataset, result, root


def test_toy_audit_asks_every_shape_of_every_scene(toy_audit) -> None:
    _, _, result, _ = toy_audit
    assert len(result.records) == SCENES * len(SHAPES)
    for index in range(SCENES):
        present = {o.shape for o in make_scene("heldout", index).objects}
        got = {r.class_name for r in result.records if r.image_id == str(index + 1) and r.present}
        assert got == present


def test_toy_j_answers_yes_no_questions_correctly(toy_audit) -> None:
    _, _, result, _ = toy_audit
    metrics = audit_metrics(result.records, rule=RULE, n_resamples=200)
    assert metrics["unparsed"] == 0
    # The toy LLaVA answers this exact question correctly ~97% of the time through W (the shipped
    # manifest's qa_by_kind); a swapped present/absent flag would put accuracy near 0.3.
    assert metrics["pope"]["accuracy"] >= 0.85
    assert 0.2 <= metrics["pope"]["yes_ratio"] <= 0.6


def test_toy_owl_confidence_separates_present_from_absent(toy_audit) -> None:
    _, _, result, _ = toy_audit
    metrics = audit_metrics(result.records, rule=RULE, n_resamples=200)
    conf = metrics["owl_confidence"]
    assert conf["yes_present"] > conf["no_absent"] + 0.2
    # J's "yes" follows what OWL-ViT sees in the same t: its score predicts the answer.
    assert metrics["auroc_owl_predicts_yes"] >= 0.9


def test_toy_audit_report_is_written(toy_audit) -> None:
    model, _, result, root = toy_audit
    report = write_audit_report(
        result, root / "report", model=model, rule=RULE, top_k=2, n_resamples=200
    )
    expected = audit_metrics(result.records, rule=RULE, n_resamples=200)
    assert report.metrics["pope"] == expected["pope"]
    assert report.gallery_path.is_file()


def test_cli_tiny_reads_the_toy_answers_with_the_authors_rule(toy_audit, capsys) -> None:
    """`hallucination-audit --tiny` reads the shipped toy world's "Yes"/"No" with the authors'
    exact rule, every answer parsed; `--parse strict` (any case) reads the same answers the
    same way."""
    from jmllm.joint.cli import main

    _, _, _, root = toy_audit
    ann, images = root / "data" / "coco" / "instances.json", root / "data" / "coco" / "images"
    common = ["hallucination-audit", "--tiny", "--annotations", str(ann), "--images", str(images)]
    assert main([*common, "--out", str(root / "cli"), "--top-k", "0", "--resamples", "100"]) == 0
    report = json.loads((root / "cli" / "report.json").read_text())
    assert report["unparsed"] == 0 and report["parse_rule"] == "authors"
    assert "strict rule" not in (root / "cli" / "gallery.html").read_text()
    out = ["--out", str(root / "cli-strict"), "--top-k", "0", "--resamples", "100"]
    assert main([*common, *out, "--parse", "strict"]) == 0
    strict = json.loads((root / "cli-strict" / "report.json").read_text())
    assert strict["parse_rule"] == "strict" and strict["unparsed"] == 0
    assert strict["pope"] == report["pope"]


def test_cli_tiny_uses_the_strict_rule_for_a_toy_llava_trained_in_lower_case(
    toy_audit, tmp_path, monkeypatch
) -> None:
    """The rule follows what the toy world's recipe trained (its manifest): a toy LLaVA trained
    with ``CaptionerRecipe(yes_no=YES_NO)`` (lower case, as toy worlds before 0.2) would have
    every answer unparsed by the authors' rule, so `--tiny` on that world reads it with the
    strict rule and the report says so."""
    import shutil

    import jmllm.joint.toy as toy
    from jmllm.joint.cli import main
    from jmllm.joint.toy.scenes import LLAVA_YES_NO, YES_NO

    # toy_yes_no reads the recipe from a world's manifest
    world = tmp_path / "world"
    shutil.copytree(toy.toy_paths().root, world)
    manifest = json.loads((world / "manifest.json").read_text())
    assert toy.toy_yes_no(world) == LLAVA_YES_NO  # the shipped recipe: LLaVA-1.5's
    manifest["recipe"]["captioner"]["yes_no"] = list(YES_NO)
    (world / "manifest.json").write_text(json.dumps(manifest))
    assert toy.toy_yes_no(world) == YES_NO
    del manifest["recipe"]["captioner"]["yes_no"]  # a manifest from before the option
    (world / "manifest.json").write_text(json.dumps(manifest))
    assert toy.toy_yes_no(world) == YES_NO

    # --tiny loads the world $JMLLM_TOY_WORLD names (the shipped weights, this manifest)
    from jmllm.joint.cli.common import TOY_WORLD_ENV

    monkeypatch.setenv(TOY_WORLD_ENV, str(world))
    _, _, _, root = toy_audit
    ann, images = root / "data" / "coco" / "instances.json", root / "data" / "coco" / "images"
    out = root / "cli-lower-case"
    args = ["hallucination-audit", "--tiny", "--annotations", str(ann), "--images", str(images)]
    assert main([*args, "--out", str(out), "--top-k", "0", "--resamples", "100"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parse_rule"] == "strict"
    assert "strict rule" in (out / "gallery.html").read_text()
