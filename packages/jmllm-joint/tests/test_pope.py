"""POPE's files and scoring rules (jmllm.joint.audit.pope), each rule checked against its published
code's behaviour on crafted answers whose expected numbers are worked out by hand here:

- ``llava``: LLaVA's llava/eval/eval_pope.py (= POPE's evaluate.py);
- ``lmms-eval``: lmms_eval/tasks/pope/utils.py (exact match after lower/strip);
- ``vlmevalkit``: vlmeval/dataset/utils/yorn.py YOrN_Extraction + POPE_rating;
- ``first-token``: the yes/no log-odds of the first answer token against a threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jmllm.joint.audit.data import AuditError
from jmllm.joint.audit.pope import (
    POPE_METRICS,
    PopeAnswer,
    PopeRow,
    bootstrap_intervals,
    disagreements,
    find_pope_files,
    first_token_margin,
    llava_rule,
    lmms_eval_rule,
    load_pope,
    metrics_from_counts,
    perception_vs_language,
    question_object,
    rule_metrics,
    score_rows,
    split_metrics,
    threshold_curve,
    vlmevalkit_rule,
    vqa_punctuation,
    yes_no_token_ids,
)


# ------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("Yes, but no.", "no"),  # commas removed, "no" is a word of the first sentence
        ("NO", "yes"),  # only No, no and not count
        ("Not at all", "yes"),  # "Not" is not "not"
        ("no\nthere is none", "yes"),  # words are split on spaces only
        ("I don't think so", "yes"),
        ("", "yes"),
    ],
)
def test_llava_rule_follows_eval_pope(answer, expected):
    assert llava_rule(answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("  NO \n", "no"),
        ("Yes.", "other"),  # exact match: punctuation is not removed
        ("Yes, there is a dog.", "other"),
        ("There is no dog", "other"),
    ],
)
def test_lmms_eval_rule_is_an_exact_match(answer, expected):
    assert lmms_eval_rule(answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes.", "yes"),
        ("No, there is no dog.", "no"),
        ("YES!", "yes"),
        ("Yes and no", "other"),  # both words: Unknown
        ("yes/no", "other"),  # "/" becomes a space: both words
        ("Nope", "other"),
        ("I cannot tell", "other"),
        ("(yes)", "yes"),
    ],
)
def test_vlmevalkit_rule_follows_yorn_extraction(answer, expected):
    assert vlmevalkit_rule(answer) == expected


def test_vqa_punctuation_as_vlmevalkit_processes_it():
    assert vqa_punctuation("yes, it is.") == "yes it is"  # ", " in the text: deleted
    assert vqa_punctuation("yes,it") == "yes it"  # no space beside it: a space
    assert vqa_punctuation("1,000 cats") == "1000 cats"  # a comma between digits: all deleted
    assert vqa_punctuation("3.5 yes.") == "3.5 yes"  # a period between digits stays


# ------------------------------------------------------------------------------------ metrics
# Ten crafted answers: label, answer text.
CRAFTED = [
    ("yes", "Yes"),  # every rule: yes (TP)
    ("yes", "Yes."),  # llava yes, lmms other, vlm yes
    ("yes", "No"),  # every rule: no (FN)
    ("yes", "There is a dog"),  # llava yes, lmms other, vlm other (Unknown)
    ("no", "No"),  # every rule: no (TN)
    ("no", "no."),  # llava no, lmms other, vlm no
    ("no", "Yes"),  # every rule: yes (FP)
    ("no", "There is no cat."),  # llava no, lmms other, vlm no
    ("no", "yes and no"),  # llava no, lmms other, vlm other
    ("no", "Sure"),  # llava yes (FP), lmms other, vlm other
]


def _metrics(rule: str, rows=CRAFTED) -> dict:
    labels = [label for label, _ in rows]
    return rule_metrics(rule, labels, [_pred(rule, text) for _, text in rows])


def _pred(rule: str, text: str) -> str:
    return {"llava": llava_rule, "lmms-eval": lmms_eval_rule, "vlmevalkit": vlmevalkit_rule}[rule](
        text
    )


def test_llava_metrics_by_hand():
    m = _metrics("llava")
    # yes predictions: rows 1, 2, 4 (TP), 7, 10 (FP); no: row 3 (FN), 5, 6, 8, 9 (TN)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"]) == (3, 2, 4, 1, 0)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    p, r = 3 / 5, 3 / 4
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["yes_ratio"] == pytest.approx(5 / 10)


def test_lmms_eval_metrics_by_hand():
    m = _metrics("lmms-eval")
    # exact yes/no only: row 1 TP, row 3 FN, row 5 TN, row 7 FP; six others
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"]) == (1, 1, 1, 1, 6)
    assert m["accuracy"] == pytest.approx(2 / 10)  # others are wrong
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)  # others on present objects left out: 1 / (1 + 1)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(2 / 10)


def test_vlmevalkit_metrics_by_hand():
    m = _metrics("vlmevalkit")
    # Yes: rows 1, 2 (TP), 7 (FP); No: row 3 (FN), 5, 6, 8 (TN); Unknown: rows 4 (present), 9, 10
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"], m["other_present"]) == (
        2, 1, 3, 1, 3, 1,
    )  # fmt: skip
    assert m["accuracy"] == pytest.approx(5 / 10)  # Unknown is wrong, even on an absent object
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)  # Unknown on a present object counts as "no"
    p, r = 2 / 3, 2 / 4
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["yes_ratio"] == pytest.approx(3 / 10)


@pytest.mark.parametrize("rule", ["llava", "lmms-eval", "vlmevalkit"])
def test_vectorised_metrics_equal_rule_metrics(rule):
    m = _metrics(rule)
    counts = [m["tp"], m["fp"], m["tn"], m["fn"], m["other_present"],
              m["other"] - m["other_present"]]  # fmt: skip
    vectorised = metrics_from_counts(counts, rule)
    for name in POPE_METRICS:
        assert float(vectorised[name]) == pytest.approx(m[name]), name


def test_bootstrap_intervals_resample_images():
    rows, answers = [], {}
    for i in range(40):  # 40 images, one question per split; every tenth answer wrong
        for split, obj, label in (("random", "dog", "yes"), ("adversarial", "cat", "no")):
            row = _row(split, f"{i}.jpg", obj, label, len(rows))
            rows.append(row)
            wrong = i % 10 == 0 and split == "adversarial"
            answers[(row.image, row.text)] = PopeAnswer(
                "Yes" if (label == "yes") != wrong else "No"
            )
    scored = score_rows(rows, answers, "llava")
    splits = ["random", "adversarial"]
    point = split_metrics(scored, "llava", splits)
    ci = bootstrap_intervals(scored, "llava", splits, n_resamples=500, seed=3)
    for name in ("adversarial", "mean", "pooled"):
        low, high = ci[name]["accuracy"]
        assert low <= point[name]["accuracy"] <= high and low < high
    assert ci["random"]["accuracy"] == [1.0, 1.0]  # every random answer is right
    # random's precision is undefined in no resample, its recall never: counted, not hidden
    assert ci["undefined_resamples"]["random"]["recall"] == 0
    assert bootstrap_intervals(scored, "llava", splits, n_resamples=500, seed=3) == ci
    one = [s for s in scored if s.row.image == "0.jpg"]
    assert bootstrap_intervals(one, "llava", splits)["mean"]["f1"] is None  # one image


def test_undefined_ratios_are_none_not_zero():
    m = rule_metrics("llava", ["no", "no"], ["no", "no"])
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None
    assert m["accuracy"] == 1.0 and m["yes_ratio"] == 0.0
    assert rule_metrics("llava", [], [])["accuracy"] is None
    with pytest.raises(AuditError, match="rule"):
        rule_metrics("gpt", ["yes"], ["yes"])


def _row(split, image, obj, label, qid=0):
    return PopeRow(split, qid, qid, image, f"Is there a {obj} in the image?", label, obj)


def test_mean_and_pooled_differ_as_the_harnesses_do():
    rows = [
        _row("random", "a.jpg", "dog", "yes", 1),
        _row("random", "a.jpg", "cat", "no", 2),
        _row("adversarial", "a.jpg", "dog", "yes", 1),
        _row("adversarial", "a.jpg", "car", "no", 2),
        _row("adversarial", "b.jpg", "cup", "yes", 3),
        _row("adversarial", "b.jpg", "bus", "no", 4),
    ]
    answers = {
        ("a.jpg", rows[0].text): PopeAnswer("Yes"),
        ("a.jpg", rows[1].text): PopeAnswer("No"),
        ("a.jpg", rows[3].text): PopeAnswer("Yes"),  # FP
        ("b.jpg", rows[4].text): PopeAnswer("No"),  # FN
        ("b.jpg", rows[5].text): PopeAnswer("No"),
    }
    scored = score_rows(rows, answers, "llava")
    assert len(scored) == 6  # the shared positive question answers both splits
    m = split_metrics(scored, "llava", ["random", "adversarial"])
    assert m["random"]["f1"] == 1.0
    # adversarial: TP 1 (a dog), FP 1 (a car), FN 1 (b cup), TN 1: P = R = 1/2
    assert m["adversarial"]["f1"] == pytest.approx(0.5)
    assert m["mean"]["f1"] == pytest.approx((1.0 + 0.5) / 2)
    # pooled: TP 2, FP 1, FN 1: P = R = 2/3
    assert m["pooled"]["f1"] == pytest.approx(2 / 3)
    assert m["mean"]["splits"] == ["random", "adversarial"]


def test_first_token_rule_threshold_and_curve():
    rows = [_row("random", "a.jpg", o, lab, i) for i, (o, lab) in enumerate(
        [("dog", "yes"), ("cat", "yes"), ("car", "no"), ("bus", "no")])]  # fmt: skip
    margins = [2.0, -0.5, 0.5, -3.0]
    answers = {
        ("a.jpg", r.text): PopeAnswer("", margin=m) for r, m in zip(rows, margins, strict=True)
    }
    at_zero = rule_metrics("first-token", ["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"])
    scored = score_rows(rows, answers, "first-token", threshold=0.0)
    assert [s.prediction for s in scored] == ["yes", "no", "yes", "no"]
    assert split_metrics(scored, "first-token", ["random"])["random"] == at_zero
    at_one = score_rows(rows, answers, "first-token", threshold=1.0)
    assert [s.prediction for s in at_one] == ["yes", "no", "no", "no"]
    curve = threshold_curve(scored, ["random"])
    zero = curve["thresholds"].index(0.0)
    assert curve["random"]["f1"][zero] == at_zero["f1"]
    assert curve["random"]["yes_ratio"][0] == 1.0  # below every margin: all yes
    # margins order the truth: yes 2.0 > no 0.5 > yes -0.5 > no -3.0 → 3 of 4 pairs right
    assert curve["auroc"] == pytest.approx(3 / 4)
    best = curve["best_f1"]["random"]
    assert best["f1"] == pytest.approx(max(v for v in curve["random"]["f1"] if v is not None))
    missing = score_rows(rows, {("a.jpg", rows[0].text): PopeAnswer("Yes")}, "first-token")
    assert missing[0].prediction == "other"  # no margin: never guessed


def test_first_token_margin_is_a_log_odds():
    logits = torch.tensor([1.0, 2.0, 0.5, 0.0])
    expected = math.log(math.exp(2.0) + math.exp(0.5)) - math.log(math.exp(1.0))
    assert first_token_margin(logits, [1, 2], [0]) == pytest.approx(expected)
    assert first_token_margin(logits, [], [0]) is None


def test_yes_no_token_ids_of_the_toy_tokenizer():
    from transformers import AutoTokenizer

    from jmllm.joint.toy import toy_paths

    tokenizer = AutoTokenizer.from_pretrained(toy_paths().llava)
    yes, no = yes_no_token_ids(tokenizer)
    # the toy LLaVA answers " Yes" (one token) or " No" ("▁", "N", "o"): no spelling of "no" is
    # one token, so "no" is the first token of " No", which no spelling of "yes" is
    spell = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No")}
    assert yes == spell["Yes"] and len(spell["No"]) > 1 and no == spell["No"][:1]
    assert no[0] not in yes


def test_yes_no_token_ids_fall_back_only_where_a_word_has_no_one_token_spelling():
    class Tokenizer:  # spells words by a table; anything else letter by letter
        def __init__(self, table):
            self.table = table

        def __call__(self, text, add_special_tokens=False):
            ids = self.table.get(text) or [1000 + ord(c) for c in text]
            return {"input_ids": list(ids)}

    whole = {" Yes": [1], "Yes": [1], " No": [2], "No": [2], "no": [3]}
    assert yes_no_token_ids(Tokenizer(whole)) == ([1], [2, 3])  # no fallback needed
    split_no = {" Yes": [1], "Yes": [1], " No": [7, 8]}  # " No" is two tokens
    assert yes_no_token_ids(Tokenizer(split_no)) == ([1], [7])
    shared = {" Yes": [7, 9], " No": [7, 8]}  # both start with the same token: nothing to read
    assert yes_no_token_ids(Tokenizer(shared)) == ([], [])


def test_perception_vs_language_by_hand():
    rows = [_row("random", "a.jpg", o, lab, i) for i, (o, lab) in enumerate(
        [("dog", "no"), ("cat", "no"), ("car", "yes"), ("bus", "yes"), ("cup", "no")])]  # fmt: skip
    answers = {
        ("a.jpg", rows[0].text): PopeAnswer("Yes", owl_score=0.6),  # FP, OWL sees it: perception
        ("a.jpg", rows[1].text): PopeAnswer("Yes", owl_score=0.02),  # FP, OWL right: language
        ("a.jpg", rows[2].text): PopeAnswer("No", owl_score=0.05),  # FN, OWL misses: perception
        ("a.jpg", rows[3].text): PopeAnswer("No", owl_score=0.9),  # FN, OWL right: language
        ("a.jpg", rows[4].text): PopeAnswer("No", owl_score=0.9),  # correct: not counted
    }
    split = perception_vs_language(score_rows(rows, answers, "llava"), threshold=0.1).to_json()
    assert split["errors"] == 4 and split["counts"] == {"perception": 2, "language": 2}
    assert split["perception"] == 0.5 and split["language"] == 0.5
    assert split["by_kind"] == {
        "positive": {"perception": 1, "language": 1},
        "negative": {"perception": 1, "language": 1},
    }


def test_disagreements_count_rows_where_rules_part():
    rows = [_row("random", "a.jpg", o, "yes", i) for i, o in enumerate(["dog", "cat"])]
    answers = {("a.jpg", rows[0].text): PopeAnswer("Yes.", margin=1.0),
               ("a.jpg", rows[1].text): PopeAnswer("Yes", margin=1.0)}  # fmt: skip
    d = disagreements(rows, answers)
    assert d["llava vs lmms-eval"] == {"rows": 1, "examples": ["Yes."]}
    assert d["llava vs vlmevalkit"]["rows"] == 0


# ------------------------------------------------------------------------------------ files
def _write_split(folder: Path, split: str, rows: list[dict], prefix: str = "coco") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}_pope_{split}.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n_images: int, start: int = 1) -> list[dict]:
    out = []
    for i in range(n_images):
        for obj, label in (("dog", "yes"), ("traffic light", "no")):
            out.append({"question_id": start + len(out), "image": f"COCO_{i}.jpg",
                        "text": f"Is there a {obj} in the image?", "label": label})  # fmt: skip
    return out


def test_load_pope_reads_the_official_files(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for split in ("random", "popular", "adversarial"):
        _write_split(tmp_path / "coco", split, _rows(3))
    data = load_pope(tmp_path / "coco", images)
    assert data.splits == ["random", "popular", "adversarial"]
    assert len(data.rows) == 18 and data.files["random"].rows == 6
    assert data.rows[1].object == "traffic light" and data.rows[1].label == "no"
    assert data.image_names() == ["COCO_0.jpg", "COCO_1.jpg", "COCO_2.jpg"]
    assert [r.text for r in data.questions()["COCO_0.jpg"]] == [
        "Is there a dog in the image?",
        "Is there a traffic light in the image?",
    ]  # asked once for the three splits
    limited = load_pope(tmp_path / "coco", images, limit=2)
    assert limited.image_names() == ["COCO_0.jpg", "COCO_1.jpg"] and limited.excluded_images == 1
    only = load_pope(tmp_path / "coco", images, splits=["adversarial"])
    assert only.splits == ["adversarial"]


def test_random_split_of_2910_rows_is_named_as_llava_s(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rows = [{"question_id": i, "image": "a.jpg", "text": "Is there a dog in the image?",
             "label": "yes"} for i in range(2910)]  # fmt: skip
    _write_split(tmp_path, "random", rows)
    doc = load_pope(tmp_path, images).files["random"].to_json()
    assert doc["rows"] == 2910 and "e3e3926" in doc["note"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"},
         r"coco_pope_random\.json:1: label must be yes or no"),
        ({"question_id": 1, "image": "a.jpg", "label": "yes"}, r":1: missing text"),
        ({"question_id": 1, "image": "../x.jpg", "text": "Q?", "label": "yes"},
         r":1: image '\.\./x\.jpg': leaves its folder with '\.\.'"),
        ({"question_id": 1, "image": "/etc/x.jpg", "text": "Q?", "label": "yes"},
         r":1: image '/etc/x\.jpg': an absolute path"),
        ({"question_id": 1, "image": "out.jpg", "text": "Q?", "label": "yes"},
         r":1: image 'out\.jpg': a symbolic link that leads out"),
    ],
)  # fmt: skip
def test_bad_pope_rows_are_one_line_errors(tmp_path, row, message):
    images = tmp_path / "img"
    images.mkdir()
    (images / "out.jpg").symlink_to(tmp_path / "secret.jpg")  # a link out of the image folder
    _write_split(tmp_path, "random", [row])
    with pytest.raises(AuditError, match=message):
        load_pope(tmp_path, images)


def test_pope_folder_errors(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    with pytest.raises(AuditError, match="no POPE split file"):
        find_pope_files(tmp_path)
    _write_split(tmp_path, "random", _rows(1) * 2)
    with pytest.raises(AuditError, match="question_id 1 appears twice"):
        load_pope(tmp_path, images)
    _write_split(tmp_path, "random", _rows(1))
    _write_split(tmp_path, "random", _rows(1), prefix="aokvqa")
    with pytest.raises(AuditError, match="several files for POPE's random split"):
        find_pope_files(tmp_path)
    (tmp_path / "aokvqa_pope_random.json").unlink()
    with pytest.raises(AuditError, match="no file for POPE's popular split"):
        load_pope(tmp_path, images, splits=["popular"])
    with pytest.raises(AuditError, match="no such image folder"):
        load_pope(tmp_path, tmp_path / "missing")


def test_question_object():
    assert question_object("Is there an apple in the image?") == "apple"
    assert question_object("is there a  dining  table in the image ?") == "dining table"
    assert question_object("What is this?") is None


def test_docstring_examples():
    import doctest
    import importlib

    for name in (
        "audit.pope",
        "audit.chair",
        "audit.benchmark",
        "audit.benchmark_report",
        "toy.sample_data",
    ):
        module = importlib.import_module(f"jmllm.joint.{name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name
