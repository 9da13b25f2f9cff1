"""POPE as published: the official question files, the three harnesses' scoring rules and a
first-token logit rule, per split, averaged and pooled.

POPE (Li et al., EMNLP 2023) asks ``Is there a {object} in the image?`` about COCO val2014
images, half the objects present, half absent, in three splits that differ by how the absent
objects were drawn (``random``, ``popular``, ``adversarial``). Its official files
(``AoiDragon/POPE``, ``output/coco/coco_pope_{split}.json``) are JSON Lines with one question a
line: ``question_id``, ``image`` (a file name of the image folder), ``text`` and ``label``
(``yes``/``no``). :func:`load_pope` reads them as they are.

Published POPE numbers come from three harnesses that read the same answers differently
(:func:`rule_prediction`, :func:`rule_metrics`):

``llava`` (LLaVA's ``llava/eval/eval_pope.py``, identical to POPE's ``evaluate.py``)
    keep the text before the first ``.``, drop commas, split on spaces: a word ``No``, ``no``
    or ``not`` means no, anything else yes. Every answer is yes or no. Metrics per split; LLaVA's
    MODEL_ZOO quotes the **mean** of the three splits' F1.
``lmms-eval`` (``lmms_eval/tasks/pope/utils.py``)
    the answer lower-cased and stripped must equal ``yes`` or ``no`` exactly; anything else is
    wrong for accuracy and left out of recall (it is neither a true positive nor a false
    negative). Its ``pope`` task scores its test split's rows in one pool; ``pope_full`` reports
    each split.
``vlmevalkit`` (VLMEvalKit's ``YOrN_Extraction`` and ``POPE_rating``)
    VQA punctuation processing, lower case, words: ``yes`` without ``no`` is Yes, ``no`` without
    ``yes`` is No, anything else Unknown (its optional GPT matching of Unknown answers is not
    run). Unknown is wrong for accuracy and counts as a "no" prediction for precision, recall
    and F1. Its headline ("Overall") is **one F1 pooled** over the splits' rows.
``first-token``
    no text at all: the first answer token's log-odds of yes against no,
    ``logsumexp(logits[yes ids]) - logsumexp(logits[no ids])`` over the tokenizer's single-token
    spellings of yes/no (:func:`yes_no_token_ids`), compared with a threshold (0 by default);
    :func:`threshold_curve` gives the metrics at every threshold.

Metrics (:func:`rule_metrics`): accuracy = (TP + TN) / n, precision = TP / (TP + FP),
recall = TP / (TP + FN) (each rule's FN, see above), F1 = 2PR / (P + R), yes-ratio = predicted
yes / n. A ratio with a zero denominator is ``None``, never 0 (the harnesses print 0 or fail).

Example:
    >>> rule_prediction("No, there is not.", "llava"), rule_prediction("Yes.", "lmms-eval")
    ('no', 'other')
    >>> rule_prediction("Yes.", "vlmevalkit")
    'yes'
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jmllm.align.files import resolve_inside
from jmllm.align.options import clip
from jmllm.joint.audit.data import AuditError

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_RULES = ("llava", "lmms-eval", "vlmevalkit", "first-token")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# The post-prompt of LLaVA-1.5's POPE question file (llava_pope_test.jsonl) and lmms-eval's task
SINGLE_WORD_PROMPT = "\nAnswer the question using a single word or phrase."
POPE_QUESTION = "{}" + SINGLE_WORD_PROMPT  # the file's question, then the post-prompt
# The rows of AoiDragon/POPE's random split at commit e3e3926, which LLaVA's evaluation pinned;
# later commits have 3,000 (AoiDragon/POPE#17).
RANDOM_ROWS_PINNED_BY_LLAVA = 2910
_QUESTION_OBJECT = re.compile(r"^\s*is there an? (.+?) in the image\s*\?", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeRow:
    """One POPE question as its file gives it.

    Attributes:
        split: ``random``, ``popular`` or ``adversarial``; line: its line in the file (1-based).
        question_id, image, text, label: the file's fields (label ``yes`` or ``no``).
        object: the object the question names (``Is there a {object} in the image?``), or None
            for a question of another form (no OWL-ViT evidence is read for it).
    """

    split: str
    line: int
    question_id: Any
    image: str
    text: str
    label: str
    object: str | None

    @property
    def present(self) -> bool:
        return self.label == "yes"


@dataclass(frozen=True)
class PopeSplitFile:
    """A split's file: where it is, how many rows, its SHA-256 (which version of POPE)."""

    split: str
    path: Path
    rows: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "file": str(self.path),
            "rows": self.rows,
            "sha256": self.sha256,
        }
        if self.split == "random" and self.rows == RANDOM_ROWS_PINNED_BY_LLAVA:
            doc["note"] = (
                "2,910 rows: POPE's random split as of commit e3e3926, the version LLaVA's "
                "evaluation pinned (later versions have 3,000)"
            )
        return doc


@dataclass
class PopeData:
    """POPE's questions (every split given) and the folder of their images."""

    rows: list[PopeRow]
    files: dict[str, PopeSplitFile]
    images: Path
    excluded_images: int = 0  # left out by ``limit``

    @property
    def splits(self) -> list[str]:
        return [s for s in POPE_SPLITS if s in self.files]

    def image_names(self) -> list[str]:
        """Every image, once, in the order of first appearance (splits in POPE's order)."""
        return list(dict.fromkeys(r.image for r in self.rows))

    def questions(self) -> dict[str, list[PopeRow]]:
        """image → its distinct questions (one row per distinct text, first appearance): the
        splits share their positive questions, which are asked once."""
        out: dict[str, dict[str, PopeRow]] = {}
        for row in self.rows:
            out.setdefault(row.image, {}).setdefault(row.text, row)
        return {image: list(rows.values()) for image, rows in out.items()}


def find_pope_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The split files of a folder: ``*pope_{split}.json`` or ``.jsonl`` (POPE's
    ``coco_pope_random.json`` …), in the folder or its ``pope/`` subfolder.

    Raises:
        AuditError: no such folder, no split file, or two files for one split.

    Example:
        >>> find_pope_files("POPE/output/coco")  # doctest: +SKIP
        {'random': PosixPath('POPE/output/coco/coco_pope_random.json'), ...}
    """
    root = Path(folder)
    if not root.is_dir():
        raise AuditError(f"{root}: no such POPE folder")
    for where in (root, root / "pope"):
        found: dict[str, Path] = {}
        for split in POPE_SPLITS:
            names = sorted(
                p
                for pattern in (f"*pope_{split}.json", f"*pope_{split}.jsonl")
                for p in where.glob(pattern)
                if p.is_file()
            )
            if len(names) > 1:
                listed = ", ".join(p.name for p in names)
                raise AuditError(f"{where}: several files for POPE's {split} split ({listed})")
            if names:
                found[split] = names[0]
        if found:
            return found
    raise AuditError(
        f"{root}: no POPE split file (expected *pope_random.json, *pope_popular.json, "
        "*pope_adversarial.json, here or in pope/)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def question_object(text: str) -> str | None:
    """The object of a POPE question, or None for another form.

    Example:
        >>> question_object("Is there a dining table in the image?"), question_object("Why?")
        ('dining table', None)
    """
    match = _QUESTION_OBJECT.match(text)
    return " ".join(match.group(1).split()) if match else None


def _image_name(value: Any, where: str, images: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = clip(repr(value)) if isinstance(value, str) else type(value).__name__
        raise AuditError(f"{where}: 'image' must be a non-empty file name, got {shown}")
    name = value.strip()
    try:  # inside the image folder: no absolute path, no "..", no link that leads out
        resolve_inside(images, name, f"{where}: image")
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    return name


def read_split(path: str | os.PathLike[str], split: str, images: Path) -> list[PopeRow]:
    """The rows of one split file (JSON Lines; blank lines skipped).

    Raises:
        AuditError: unreadable file, a line that is not a JSON object with ``question_id``,
            ``image``, ``text`` and a ``label`` of ``yes``/``no``, or a question id twice.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{file}: cannot read ({exc})") from None
    rows: list[PopeRow] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise AuditError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(doc, dict):
            raise AuditError(f"{where}: expected a JSON object")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in doc]
        if missing:
            raise AuditError(f"{where}: missing {', '.join(missing)}")
        label = str(doc["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise AuditError(f"{where}: label must be yes or no, got {clip(repr(doc['label']))}")
        text = doc["text"]
        if not isinstance(text, str) or not text.strip():
            raise AuditError(f"{where}: 'text' must be a non-empty question")
        key = json.dumps(doc["question_id"])
        if key in seen:
            raise AuditError(f"{where}: question_id {doc['question_id']!r} appears twice")
        seen.add(key)
        rows.append(
            PopeRow(
                split=split,
                line=number,
                question_id=doc["question_id"],
                image=_image_name(doc["image"], where, images),
                text=text.strip(),
                label=label,
                object=question_object(text),
            )
        )
    if not rows:
        raise AuditError(f"{file}: no questions")
    return rows


def load_pope(
    folder: str | os.PathLike[str],
    images: str | os.PathLike[str],
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> PopeData:
    """POPE's question files of a folder (:func:`find_pope_files`) and their image folder.

    Args:
        folder: the folder of ``coco_pope_{split}.json`` (e.g. ``POPE/output/coco``).
        images: the folder the files' ``image`` names are in (COCO ``val2014``).
        splits: the splits to read (default every split found).
        limit: keep only the first ``limit`` images (order of first appearance) and their rows.

    Returns:
        :class:`PopeData`.

    Raises:
        AuditError: a missing folder or split, a malformed file.

    Example:
        >>> data = load_pope("POPE/output/coco", "coco/val2014")  # doctest: +SKIP
        >>> {s: f.rows for s, f in data.files.items()}  # doctest: +SKIP
        {'random': 3000, 'popular': 3000, 'adversarial': 3000}
    """
    image_folder = Path(images)
    if not image_folder.is_dir():
        raise AuditError(f"{image_folder}: no such image folder")
    found = find_pope_files(folder)
    wanted = list(splits) if splits is not None else list(found)
    for split in wanted:
        if split not in POPE_SPLITS:
            raise AuditError(f"split: {split!r} is not one of {', '.join(POPE_SPLITS)}")
        if split not in found:
            raise AuditError(f"{folder}: no file for POPE's {split} split")
    rows: list[PopeRow] = []
    files: dict[str, PopeSplitFile] = {}
    for split in POPE_SPLITS:
        if split not in wanted:
            continue
        split_rows = read_split(found[split], split, image_folder)
        files[split] = PopeSplitFile(split, found[split], len(split_rows), _sha256(found[split]))
        rows.extend(split_rows)
    excluded = 0
    if limit is not None:
        if limit < 1:
            raise AuditError(f"limit: must be at least 1, got {limit}")
        names = list(dict.fromkeys(r.image for r in rows))
        kept = set(names[:limit])
        excluded = len(names) - len(kept)
        rows = [r for r in rows if r.image in kept]
    return PopeData(rows, files, image_folder, excluded)


# ---------------------------------------------------------------------------------------------
# Scoring rules
# ---------------------------------------------------------------------------------------------


def llava_rule(text: str) -> str:
    """LLaVA's (and POPE's) rule: ``"no"`` if the first sentence has the word No/no/not.

    Example:
        >>> llava_rule("Yes, there is a dog."), llava_rule("There is no dog."), llava_rule("NO")
        ('yes', 'no', 'yes')
    """
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def lmms_eval_rule(text: str) -> str:
    """lmms-eval's rule: the answer lower-cased and stripped is exactly ``yes`` or ``no``;
    anything else is ``"other"``.

    Example:
        >>> lmms_eval_rule(" Yes\\n"), lmms_eval_rule("Yes."), lmms_eval_rule("no")
        ('yes', 'other', 'no')
    """
    pred = text.lower().strip()
    return pred if pred in ("yes", "no") else "other"


_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")  # fmt: skip
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def vqa_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation processing, as VLMEvalKit's ``process_punctuation``
    applies it: a mark next to a space (or any text with a comma between digits) is deleted,
    otherwise replaced by a space; periods not between digits are deleted (at most 32, as the
    original passes ``re.UNICODE`` where ``re.sub`` takes its count).

    Example:
        >>> vqa_punctuation("yes, it is"), vqa_punctuation("yes/no")
        ('yes it is', 'yes no')
    """
    out = text
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=int(re.UNICODE))


def vlmevalkit_rule(text: str) -> str:
    """VLMEvalKit's ``YOrN_Extraction``: ``"yes"`` when the words hold yes but not no,
    ``"no"`` when they hold no but not yes, otherwise ``"other"`` (its Unknown).

    Example:
        >>> vlmevalkit_rule("Yes."), vlmevalkit_rule("No, it is not."), vlmevalkit_rule("yes or no")
        ('yes', 'no', 'other')
    """
    words = vqa_punctuation(text.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return "other"


def rule_prediction(
    answer: str, rule: str, margin: float | None = None, threshold: float = 0.0
) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` for one answer under a rule.

    Args:
        answer: the answer text.
        rule: one of :data:`POPE_RULES`.
        margin: the first token's yes-minus-no log-odds (``first-token`` only; None: ``"other"``).
        threshold: ``first-token``: yes when the margin is above it.

    Example:
        >>> rule_prediction("", "first-token", margin=0.3), rule_prediction("", "first-token", 0.3, 1)
        ('yes', 'no')
    """
    if rule == "llava":
        return llava_rule(answer)
    if rule == "lmms-eval":
        return lmms_eval_rule(answer)
    if rule == "vlmevalkit":
        return vlmevalkit_rule(answer)
    if rule == "first-token":
        if margin is None or not math.isfinite(margin):
            return "other"
        return "yes" if margin > threshold else "no"
    raise AuditError(f"rule: {rule!r} is not one of {', '.join(POPE_RULES)}")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def rule_metrics(rule: str, labels: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio of predictions as ``rule``'s harness counts
    them (see the module docstring), with the counts.

    Args:
        rule: one of :data:`POPE_RULES` (decides how ``"other"`` predictions count).
        labels: ``"yes"``/``"no"`` per question.
        predictions: ``"yes"``/``"no"``/``"other"`` per question.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (None where undefined),
        ``n``, ``tp``, ``fp``, ``tn``, ``fn``, ``other`` (answers neither yes nor no) and
        ``other_present`` (of those, on present objects).

    Example:
        >>> rule_metrics("lmms-eval", ["yes", "yes", "no"], ["yes", "other", "no"])["recall"]
        1.0
        >>> rule_metrics("vlmevalkit", ["yes", "yes", "no"], ["yes", "other", "no"])["recall"]
        0.5
    """
    if rule not in POPE_RULES:
        raise AuditError(f"rule: {rule!r} is not one of {', '.join(POPE_RULES)}")
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels for {len(predictions)} predictions")
    tp = fp = tn = fn = other = other_present = 0
    for label, pred in zip(labels, predictions, strict=True):
        if pred == "yes":
            tp, fp = tp + (label == "yes"), fp + (label != "yes")
        elif pred == "no":
            fn, tn = fn + (label == "yes"), tn + (label != "yes")
        else:
            other += 1
            other_present += label == "yes"
    n = len(labels)
    # vlmevalkit counts Unknown as a "no" prediction for recall; lmms-eval leaves it out
    missed = fn + (other_present if rule == "vlmevalkit" else 0)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + missed)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": _ratio(tp + fp, n),
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "other": other,
        "other_present": other_present,
    }


def yes_no_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The token ids that spell yes and no whole as a first answer token: each spelling (``Yes``,
    ``yes``, ``YES``, with and without a leading space) that the tokenizer encodes as one token.

    Example:
        >>> yes_no_token_ids(model.tokenizer)  # LLaVA-1.5's Llama tokenizer  # doctest: +SKIP
        ([3869, 4874, 21143], [1939, 694, 11698])
    """
    found: dict[str, list[int]] = {"yes": [], "no": []}
    for word in ("yes", "no"):
        for spelling in (word.capitalize(), word, word.upper()):
            for text in (spelling, " " + spelling):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and int(ids[0]) not in found[word]:
                    found[word].append(int(ids[0]))
    return found["yes"], found["no"]


def first_token_margin(logits: Any, yes_ids: Sequence[int], no_ids: Sequence[int]) -> float | None:
    """``logsumexp(logits[yes_ids]) - logsumexp(logits[no_ids])`` of one first answer token
    (None without yes or no ids).

    Example:
        >>> import torch
        >>> round(first_token_margin(torch.tensor([0.0, 2.0, 1.0]), [1], [2]), 3)
        1.0
    """
    import torch

    if not yes_ids or not no_ids:
        return None
    row = torch.as_tensor(logits).float().flatten()
    yes = torch.logsumexp(row[list(yes_ids)], dim=0)
    no = torch.logsumexp(row[list(no_ids)], dim=0)
    return float(yes - no)


# ---------------------------------------------------------------------------------------------
# Scoring a run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeAnswer:
    """J's answer to one distinct question of an image, with OWL-ViT's evidence.

    Attributes:
        answer: the answer text; finished: it ended with end-of-sequence.
        margin: the first token's yes-minus-no log-odds (None if not computed).
        owl_score: OWL-ViT's best score for the question's object on the same ``t``.
        box: the best patch's box, ``x0, y0, x1, y1`` in pixels of the original image.
    """

    answer: str
    finished: bool = True
    margin: float | None = None
    owl_score: float | None = None
    box: tuple[float, ...] | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class ScoredRow:
    """A row of a split with J's answer and its prediction under a rule."""

    row: PopeRow
    answer: PopeAnswer
    prediction: str


def score_rows(
    rows: Iterable[PopeRow],
    answers: Mapping[tuple[str, str], PopeAnswer],
    rule: str,
    threshold: float = 0.0,
) -> list[ScoredRow]:
    """Every row that has an answer (keyed by image and question text), predicted by ``rule``."""
    out = []
    for row in rows:
        answer = answers.get((row.image, row.text))
        if answer is None:
            continue
        pred = rule_prediction(answer.answer, rule, answer.margin, threshold)
        out.append(ScoredRow(row, answer, pred))
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean([float(v) for v in values if v is not None]))


def split_metrics(scored: Sequence[ScoredRow], rule: str, splits: Sequence[str]) -> dict[str, Any]:
    """``{split: metrics, "mean": …, "pooled": …}``: every split's :func:`rule_metrics`, their
    mean (LLaVA's MODEL_ZOO figure; a metric undefined in one split is undefined in the mean)
    and the metrics of all rows pooled (VLMEvalKit's Overall, lmms-eval's ``pope`` task)."""
    out: dict[str, Any] = {}
    for split in splits:
        rows = [s for s in scored if s.row.split == split]
        out[split] = rule_metrics(rule, [s.row.label for s in rows], [s.prediction for s in rows])
    present = [s for s in splits if out[s]["n"]]
    out["mean"] = {m: _mean([out[s][m] for s in present]) for m in POPE_METRICS}
    out["mean"]["splits"] = present
    out["pooled"] = rule_metrics(
        rule, [s.row.label for s in scored], [s.prediction for s in scored]
    )
    return out


def _ratio_array(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def metrics_from_counts(counts: np.ndarray, rule: str) -> dict[str, np.ndarray]:
    """:func:`rule_metrics` of summed counts, vectorised: ``counts`` (..., 6) holds TP, FP, TN,
    FN, other answers on present objects, other answers on absent ones; NaN where undefined."""
    tp, fp, tn, fn, other_pos, other_neg = np.moveaxis(np.asarray(counts, float), -1, 0)
    n = tp + fp + tn + fn + other_pos + other_neg
    missed = fn + (other_pos if rule == "vlmevalkit" else 0.0)
    precision = _ratio_array(tp, tp + fp)
    recall = _ratio_array(tp, tp + missed)
    with np.errstate(invalid="ignore"):
        f1 = _ratio_array(2 * precision * recall, precision + recall)
    return {
        "accuracy": _ratio_array(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1),
        "yes_ratio": _ratio_array(tp + fp, n),
    }


def bootstrap_intervals(
    scored: Sequence[ScoredRow],
    rule: str,
    splits: Sequence[str],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of every split's metrics, their mean and the pooled rows,
    resampling **images** (an image's questions share its embedding, and its positive questions
    are shared by the splits): one draw of images serves every split of a resample.

    Returns:
        ``{split|"mean"|"pooled": {metric: [low, high] or None}}`` (None: fewer than two images
        or no resample where the metric is defined), and ``undefined_resamples``.

    Example:
        >>> bootstrap_intervals(scored, "llava", ["random"])["random"]["f1"]  # doctest: +SKIP
        [0.81, 0.9]
    """
    images = list(dict.fromkeys(s.row.image for s in scored))
    index = {image: i for i, image in enumerate(images)}
    column = {("yes", "yes"): 0, ("yes", "no"): 1, ("no", "no"): 2, ("no", "yes"): 3}
    counts = np.zeros((len(splits), len(images), 6))  # (K, I, 6)
    position = {split: k for k, split in enumerate(splits)}
    for s in scored:
        if s.row.split not in position:
            continue
        if s.prediction in ("yes", "no"):
            c = column[(s.prediction, s.row.label)]
        else:
            c = 4 if s.row.present else 5
        counts[position[s.row.split], index[s.row.image], c] += 1
    names = [*splits, "mean", "pooled"]
    out: dict[str, Any] = {name: dict.fromkeys(POPE_METRICS) for name in names}
    out["undefined_resamples"] = {name: dict.fromkeys(POPE_METRICS, 0) for name in names}
    if len(images) < 2:
        return out
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(images), size=(n_resamples, len(images)))  # (R, I)
    weights = np.stack([np.bincount(d, minlength=len(images)) for d in draws])  # (R, I)
    sums = np.einsum("ri,kic->krc", weights, counts)  # (K, R, 6)
    per_split = metrics_from_counts(sums, rule)  # metric -> (K, R)
    present = [k for k, split in enumerate(splits) if counts[k].sum() > 0]
    values: dict[str, dict[str, np.ndarray]] = {
        split: {m: per_split[m][k] for m in POPE_METRICS} for k, split in enumerate(splits)
    }
    values["mean"] = {m: per_split[m][present].mean(axis=0) for m in POPE_METRICS}
    pooled = metrics_from_counts(sums.sum(axis=0), rule)
    values["pooled"] = {m: pooled[m] for m in POPE_METRICS}
    alpha = (1 - confidence) / 2
    for name in names:
        for metric in POPE_METRICS:
            draw = values[name][metric]
            defined = draw[~np.isnan(draw)]
            out["undefined_resamples"][name][metric] = int(len(draw) - len(defined))
            if len(defined):
                low, high = np.quantile(defined, [alpha, 1 - alpha])
                out[name][metric] = [float(low), float(high)]
    return out


HEADLINES = {
    "llava": ("mean", "LLaVA's MODEL_ZOO: the mean of the three splits' F1"),
    "lmms-eval": ("pooled", "lmms-eval's pope task: F1 over its rows in one pool"),
    "vlmevalkit": ("pooled", "VLMEvalKit's Overall: one F1 pooled over the splits"),
    "first-token": ("mean", "the mean of the splits' F1, as LLaVA's"),
}


def threshold_curve(
    scored: Sequence[ScoredRow], splits: Sequence[str], points: int = 101
) -> dict[str, Any]:
    """The ``first-token`` rule's metrics as its threshold moves: at most ``points``
    thresholds (quantiles of the margins, and 0), per split and their mean.

    Returns:
        ``thresholds`` and, per split and ``mean``, lists of every metric; ``best_f1`` per split
        (threshold and F1: chosen on the data itself, an optimistic figure); ``auroc`` of the
        margin for the truth.

    Example:
        >>> curve = threshold_curve(scored, ["random"])  # doctest: +SKIP
        >>> curve["random"]["f1"][curve["thresholds"].index(0.0)]  # doctest: +SKIP
    """
    from jmllm.joint.audit.metrics import auroc

    usable = [s for s in scored if s.answer.margin is not None and math.isfinite(s.answer.margin)]
    if not usable:
        return {"thresholds": [], "available": False}
    margins = np.array([s.answer.margin for s in usable], dtype=np.float64)
    quantiles = np.quantile(margins, np.linspace(0.0, 1.0, max(2, points - 1)))
    # just below the smallest margin everything is yes; the quantiles and 0 in between
    grid = sorted({float(margins.min()) - 1e-6, 0.0, *(float(q) for q in quantiles)})
    out: dict[str, Any] = {"thresholds": grid, "available": True}
    for split in [*splits, "mean"]:
        out[split] = {m: [] for m in POPE_METRICS}
    for threshold in grid:
        rescored = [
            ScoredRow(s.row, s.answer, "yes" if s.answer.margin > threshold else "no")  # type: ignore[operator]
            for s in usable
        ]
        metrics = split_metrics(rescored, "first-token", splits)
        for split in [*splits, "mean"]:
            for m in POPE_METRICS:
                out[split][m].append(metrics[split][m])
    out["best_f1"] = {}
    for split in [*splits, "mean"]:
        f1 = [v if v is not None else -1.0 for v in out[split]["f1"]]
        best = int(np.argmax(f1))
        out["best_f1"][split] = {"threshold": grid[best], "f1": out[split]["f1"][best]}
    out["auroc"] = auroc(margins.tolist(), [s.row.present for s in usable])
    return out


@dataclass
class PerceptionSplit:
    """J's hallucinations (wrong yes/no answers) split by OWL-ViT's evidence on the same ``t``:
    ``perception`` where OWL-ViT was already wrong (scored an absent object at or above the
    threshold, or a present one below it), ``language`` where OWL-ViT was right and the LLM still
    erred. Fractions of the errors with OWL-ViT evidence; counts by kind."""

    threshold: float
    errors: int = 0
    perception: int = 0
    language: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    no_evidence: int = 0  # errors without an OWL-ViT score (a question of another form)

    def add(self, kind: str, owl_wrong: bool | None) -> None:
        """Count one error of ``kind`` (``positive``: yes to an absent object; ``negative``: no
        to a present one); ``owl_wrong`` None: no evidence."""
        self.errors += 1
        if owl_wrong is None:
            self.no_evidence += 1
            return
        side = "perception" if owl_wrong else "language"
        setattr(self, side, getattr(self, side) + 1)
        counts = self.by_kind.setdefault(kind, {"perception": 0, "language": 0})
        counts[side] += 1

    def to_json(self) -> dict[str, Any]:
        judged = self.perception + self.language
        return {
            "perception": self.perception / judged if judged else None,
            "language": self.language / judged if judged else None,
            "counts": {"perception": self.perception, "language": self.language},
            "errors": self.errors,
            "without_evidence": self.no_evidence,
            "by_kind": self.by_kind,
            "owl_threshold": self.threshold,
        }


def perception_vs_language(scored: Sequence[ScoredRow], threshold: float) -> PerceptionSplit:
    """Split J's wrong yes/no answers by whether OWL-ViT's score on the same ``t`` was already
    wrong at ``threshold`` (see :class:`PerceptionSplit`); unparsed answers are not errors.

    Example:
        >>> perception_vs_language(scored, 0.1).to_json()["perception"]  # doctest: +SKIP
        0.62
    """
    split = PerceptionSplit(threshold)
    for s in scored:
        if s.prediction not in ("yes", "no") or s.prediction == s.row.label:
            continue
        kind = "positive" if s.prediction == "yes" else "negative"
        score = s.answer.owl_score
        owl_wrong = None if score is None else (score >= threshold) != s.row.present
        split.add(kind, owl_wrong)
    return split


def disagreements(
    rows: Sequence[PopeRow], answers: Mapping[tuple[str, str], PopeAnswer], threshold: float = 0.0
) -> dict[str, Any]:
    """How often the rules disagree on the same answers: for every pair of rules, the rows they
    predict differently, and up to five example answers.

    Example:
        >>> disagreements(data.rows, answers)["llava|lmms-eval"]["rows"]  # doctest: +SKIP
    """
    predictions = {
        rule: [p.prediction for p in score_rows(rows, answers, rule, threshold)]
        for rule in POPE_RULES
    }
    texts = [answers[(r.image, r.text)].answer for r in rows if (r.image, r.text) in answers]
    out: dict[str, Any] = {}
    for i, a in enumerate(POPE_RULES):
        for b in POPE_RULES[i + 1 :]:
            differ = [
                k
                for k, (x, y) in enumerate(zip(predictions[a], predictions[b], strict=True))
                if x != y
            ]
            examples = list(dict.fromkeys(texts[k] for k in differ))[:5]
            out[f"{a} vs {b}"] = {"rows": len(differ), "examples": examples}
    return out


__all__ = [
    "HEADLINES",
    "POPE_METRICS",
    "POPE_QUESTION",
    "POPE_RULES",
    "POPE_SPLITS",
    "SINGLE_WORD_PROMPT",
    "PerceptionSplit",
    "PopeAnswer",
    "PopeData",
    "PopeRow",
    "PopeSplitFile",
    "ScoredRow",
    "bootstrap_intervals",
    "disagreements",
    "find_pope_files",
    "first_token_margin",
    "llava_rule",
    "lmms_eval_rule",
    "load_pope",
    "metrics_from_counts",
    "perception_vs_language",
    "question_object",
    "read_split",
    "rule_metrics",
    "rule_prediction",
    "score_rows",
    "split_metrics",
    "threshold_curve",
    "vlmevalkit_rule",
    "vqa_punctuation",
]
