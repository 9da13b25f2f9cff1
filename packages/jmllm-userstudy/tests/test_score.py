from __future__ import annotations

import json
import math
import shutil

import pytest
from scipy.stats import binomtest

from jmllm.userstudy.cli import main
from jmllm.userstudy.report import markdown_report, write_results
from jmllm.userstudy.score import Rate, score_answers
from jmllm.userstudy.spec import load_spec
from jmllm.userstudy.testing import answers_document, write_answers


def _write(path, doc):
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_rate_is_clopper_pearson():
    rate = Rate.of(5, 7)
    ci = binomtest(5, 7).proportion_ci(method="exact")
    assert (rate.correct, rate.total) == (5, 7)
    assert rate.ci_low == pytest.approx(ci.low) and rate.ci_high == pytest.approx(ci.high)
    assert rate.ci_low == pytest.approx(0.2904, abs=1e-4)
    full = Rate.of(7, 7)
    assert full.ci_high == 1.0 and full.ci_low == pytest.approx(0.5904, abs=1e-4)
    assert math.isnan(Rate.of(0, 0).share)


def test_counts_per_question_participant_and_overall(example_spec, tmp_path):
    answers = tmp_path / "answers"
    write_answers(example_spec, answers, "P1", correct={"q1", "q2", "q3", "q4", "q5"})
    write_answers(example_spec, answers, "P2", correct={"q1", "q3"})
    write_answers(example_spec, answers, "P3", correct={"q1"})
    result = score_answers(example_spec, answers)
    assert [q.rate.correct for q in result.questions] == [3, 1, 2, 1, 1]
    assert all(q.rate.total == 3 for q in result.questions)
    assert [(p.participant_id, p.rate.correct) for p in result.participants] == [
        ("p1", 5),  # ids are shown in their normal form
        ("p2", 2),
        ("p3", 1),
    ]
    assert (result.overall.correct, result.overall.total) == (8, 15)
    assert result.files_read == 3 and result.problems == ()


def test_problem_files_are_reported_not_scored(example_dir, example_spec, tmp_path):
    answers = tmp_path / "answers"
    write_answers(example_spec, answers, "good", correct={"q1"})
    # An exact second copy of one submission: scored once.
    write_answers(example_spec, answers, "twice", correct={"q2"}, file_name="a-twice.json")
    write_answers(example_spec, answers, "twice", correct={"q2"}, file_name="b-twice.json")
    # Two different submissions of one participant: neither is scored.
    write_answers(example_spec, answers, "torn", correct={"q1"}, file_name="torn-1.json")
    write_answers(example_spec, answers, "torn", correct={"q2"}, file_name="torn-2.json")
    # Incomplete.
    doc = answers_document(example_spec, "half", correct={"q1"})
    doc["answers"][2]["choice"] = None
    _write(answers / "half.json", doc)
    # Tampered: order edited, swap flag edited, participant id edited, bad choice.
    doc = answers_document(example_spec, "reorder", correct=set())
    doc["answers"][0]["question_id"], doc["answers"][1]["question_id"] = (
        doc["answers"][1]["question_id"],
        doc["answers"][0]["question_id"],
    )
    _write(answers / "reorder.json", doc)
    doc = answers_document(example_spec, "flip", correct=set())
    doc["answers"][3]["swapped"] = not doc["answers"][3]["swapped"]
    _write(answers / "flip.json", doc)
    doc = answers_document(example_spec, "renamed", correct=set())
    doc["participant_id"] = "someone-else"
    _write(answers / "renamed.json", doc)
    doc = answers_document(example_spec, "badchoice", correct=set())
    doc["answers"][0]["choice"] = "A3"
    _write(answers / "badchoice.json", doc)
    doc = answers_document(example_spec, "bad\ud800id", correct=set())
    _write(answers / "surrogate.json", doc)
    # Not JSON, not an answers file.
    (answers / "broken.json").write_text('{"format": ')
    _write(answers / "other.json", {"hello": 1})
    # Answers for another spec (an edited copy of the example).
    other_dir = tmp_path / "other"  # a copy: a spec's images stay in its folder (no links out)
    shutil.copytree(example_dir, other_dir)
    (other_dir / "study.yaml").write_text(
        (example_dir / "study.yaml").read_text().replace("seed: 2024", "seed: 7")
    )
    other_spec = load_spec(other_dir / "study.yaml")
    assert other_spec.fingerprint() != example_spec.fingerprint()
    write_answers(other_spec, answers, "foreigner", correct={"q1"})

    result = score_answers(example_spec, answers)
    kinds = {(p.file, p.kind) for p in result.problems}
    assert kinds == {
        ("b-twice.json", "duplicate"),
        ("torn-1.json", "conflicting-duplicate"),
        ("torn-2.json", "conflicting-duplicate"),
        ("half.json", "incomplete"),
        ("reorder.json", "tampered"),
        ("flip.json", "tampered"),
        ("renamed.json", "tampered"),
        ("badchoice.json", "tampered"),
        ("surrogate.json", "tampered"),
        ("broken.json", "unreadable"),
        ("other.json", "not-answers"),
        ("answers-foreigner.json", "foreign-spec"),
    }
    assert [(p.participant_id, p.file) for p in result.participants] == [
        ("twice", "a-twice.json"),
        ("good", "answers-good.json"),
    ]
    assert result.files_read == 14
    assert [q.rate.correct for q in result.questions] == [1, 1, 0, 0, 0]
    assert {p.kind for p in result.problems if p.file == "half.json"} == {"incomplete"}
    assert (
        next(p.detail for p in result.problems if p.file == "half.json")
        == "4 of 5 questions answered"
    )


def test_reports_escape_names_and_are_complete(example_dir, spec_editor, tmp_path):
    spec = load_spec(spec_editor(example_dir, '["person", "boat"]', '["<b>x</b> | $y$", "boat"]'))
    answers = tmp_path / "answers"
    write_answers(spec, answers, "<script>alert(1)</script>", correct={"q1", "q3"})
    write_answers(spec, answers, "P2", correct={"q3"})
    result = score_answers(spec, answers)
    text = markdown_report(result)
    assert "<b>" not in text and "<script>" not in text
    assert "&lt;b&gt;x&lt;/b&gt; \\| \\$y\\$" in text  # no HTML, no column, no TeX
    assert (
        "| q3 | &lt;b&gt;x&lt;/b&gt; \\| \\$y\\$ / boat | A2 | 2 / 2 | 100% | 16%–100% | 100% |"
        in text
    )
    assert "| **Overall** | | | 3 / 10 | 30% | 7%–65% | |" in text
    paths = write_results(result, tmp_path / "results")
    doc = json.loads(paths["json"].read_text())
    assert doc["questions"][2]["rate"]["correct"] == 2
    assert doc["overall"] == {
        "correct": 3,
        "total": 10,
        "share": 0.3,
        "ci_low": pytest.approx(0.0667, abs=1e-4),
        "ci_high": pytest.approx(0.6525, abs=1e-4),
    }
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_folder_scores_nothing(example_spec, tmp_path):
    result = score_answers(example_spec, tmp_path)
    assert result.participants == () and result.overall.total == 0
    assert "No submission could be scored." in markdown_report(result)
    assert (
        json.loads(write_results(result, tmp_path / "r")["json"].read_text())["overall"]["share"]
        is None
    )


def test_cli_three_commands(tmp_path, capsys):
    assert main(["example", "-o", str(tmp_path / "spec"), "--placeholders"]) == 0
    spec_path = tmp_path / "spec" / "study.yaml"
    assert main(["render", str(spec_path), "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "questionnaire.html").is_file()
    write_answers(load_spec(spec_path), tmp_path / "answers", "P1", correct={"q1", "q2"})
    assert (
        main(["score", str(spec_path), str(tmp_path / "answers"), "--out", str(tmp_path / "res")])
        == 0
    )
    out = capsys.readouterr().out
    assert "1 submissions scored, 0 not scored; overall 2/5 correct (40%)" in out
    assert {p.name for p in (tmp_path / "res").iterdir()} == {
        "results.md",
        "results.json",
        "per_question.png",
        ".jmllm-outputs.json",  # what the command wrote there (its folder, on a rerun)
    }


def test_cli_example_is_built_from_toy_world_explanations(tmp_path, capsys):
    """``example`` (no flag): toy scenes, their shapes as objects, the toy J's GA pictures; and
    the key is what the pictures show: read off each explanation's own map (the object whose
    true box holds the map's peak), it is the spec's ``correct`` for every question."""
    pytest.importorskip("jmllm.joint")
    import numpy as np
    from PIL import Image

    from jmllm.joint import object_explanation, object_picture
    from jmllm.joint.toy import load_toy_joint
    from jmllm.joint.toy.localisation import peak_in_box
    from jmllm.joint.toy.scenes import make_scene
    from jmllm.userstudy.example import toy_questions

    assert main(["example", "-o", str(tmp_path / "spec")]) == 0
    spec = load_spec(tmp_path / "spec" / "study.yaml")
    assert len(spec.questions) == 5
    model = load_toy_joint()
    chosen = toy_questions(5, model)
    assert len({index for index, _, _ in chosen}) == 5
    for question, (index, first, second) in zip(spec.questions, chosen, strict=True):
        scene = make_scene("heldout", index)
        assert list(question.objects) == [first, second]
        assert [o.name for o in scene.objects] == [first, second]
        image = np.asarray(Image.open(tmp_path / "spec" / f"images/{question.id}.png"))
        assert np.array_equal(image, np.asarray(scene.image))
        # which object does each shown explanation point at? Match the shown pictures to the
        # explanations, then read the pointed-at object off each explanation's map
        explained = [object_explanation(scene.image, name, model=model) for name in (first, second)]
        pictures = [np.asarray(object_picture(r, p)).astype(int) for r, p in explained]
        pointed = []
        for k in (1, 2):
            shown = np.asarray(Image.open(tmp_path / "spec" / f"images/{question.id}_e{k}.png"))
            made_for = [
                i for i, want in enumerate(pictures)
                if want.shape == shown.shape and np.abs(want - shown).max() <= 2
            ]  # fmt: skip
            assert len(made_for) == 1, (question.id, k)
            saliency = explained[made_for[0]][0].map("class")
            hits = [j for j, o in enumerate(scene.objects) if peak_in_box(saliency, o.box)]
            assert len(hits) == 1, (question.id, k, hits)
            pointed.append(hits[0])
        key = "A1" if pointed == [0, 1] else "A2" if pointed == [1, 0] else None
        assert key == question.correct, (question.id, pointed)
    assert (
        main(["render", str(tmp_path / "spec" / "study.yaml"), "--out", str(tmp_path / "site")])
        == 0
    )


def test_cli_bad_input_is_one_line_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("seed: [")
    assert main(["render", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("jmllm-userstudy render: error: ")
        and "bad.yaml" in err
        and "Traceback" not in err
    )
    assert err.count("\n") == 1
    main(["example", str(tmp_path / "s"), "--placeholders"])
    assert (
        main(
            [
                "score",
                str(tmp_path / "s/study.yaml"),
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "answers folder not found" in capsys.readouterr().err


def test_default_instructions_no_longer_name_one_way_back_and_old_answers_still_score(
    example_spec, tmp_path
):
    """The default instructions leave the way back to the last page (Send when served, Download
    from a file); answers collected under the previous default wording are for the same study
    and still score, while a spec with its own instructions accepts only its own fingerprint."""
    import dataclasses
    import hashlib

    from jmllm.userstudy.spec import (
        DEFAULT_INSTRUCTIONS,
        PREVIOUS_DEFAULT_INSTRUCTIONS,
        accepted_fingerprints,
    )

    assert "download" not in DEFAULT_INSTRUCTIONS.lower()
    assert example_spec.instructions == DEFAULT_INSTRUCTIONS.strip()
    old = example_spec.fingerprint(PREVIOUS_DEFAULT_INSTRUCTIONS.strip())
    assert old != example_spec.fingerprint()
    assert accepted_fingerprints(example_spec) == (example_spec.fingerprint(), old)
    folder = tmp_path / "answers"
    folder.mkdir()
    for pid, fingerprint in (
        ("P-old", old),
        ("P-new", example_spec.fingerprint()),
        ("P-other", hashlib.sha256(b"another study").hexdigest()),
    ):
        doc = answers_document(example_spec, pid, {"q1"})
        doc["spec_fingerprint"] = fingerprint
        (folder / f"answers-{pid}.json").write_text(json.dumps(doc))
    result = score_answers(example_spec, folder)
    assert len(result.participants) == 2
    assert [p.kind for p in result.problems] == ["foreign-spec"]
    custom = dataclasses.replace(example_spec, instructions="Answer every question.")
    assert accepted_fingerprints(custom) == (custom.fingerprint(),)
