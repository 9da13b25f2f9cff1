"""POPE's scoring rules: how the three published harnesses, and a first-token logit rule, turn
an answer into yes, no or neither, and the metrics each of them counts.

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
    :func:`jmllm.joint.audit.pope.threshold_curve` gives the metrics at every threshold.

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

import math
import re
from collections.abc import Sequence
from typing import Any

from jmllm.joint.audit.dataset import AuditError

POPE_RULES = ("llava", "lmms-eval", "vlmevalkit", "first-token")
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


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
    """The token ids that spell yes and no as a first answer token: each spelling (``Yes``,
    ``yes``, ``YES``, with and without a leading space) that the tokenizer encodes as one token.

    A word none of whose spellings is one token (a small trained vocabulary, such as the toy
    LLaVA's, where `` No`` is ``▁``, ``N``, ``o``) is represented by the first token of
    LLaVA-1.5's own reply (`` Yes`` / `` No``), provided that token is not also the other word's:
    the first answer token still tells the two replies apart. LLaVA-1.5's Llama tokenizer spells
    every case of both words as one token, so this never applies to it.

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
    first: dict[str, list[int]] = {}  # the first token of LLaVA-1.5's reply, " Yes" / " No"
    for word in ("yes", "no"):
        ids = tokenizer(" " + word.capitalize(), add_special_tokens=False)["input_ids"]
        first[word] = [int(i) for i in ids[:1]]
    for word, other in (("yes", "no"), ("no", "yes")):
        token = first[word]
        if not found[word] and token and token != first[other] and token[0] not in found[other]:
            found[word] = token
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


__all__ = [
    "POPE_METRICS",
    "POPE_RULES",
    "first_token_margin",
    "llava_rule",
    "lmms_eval_rule",
    "rule_metrics",
    "rule_prediction",
    "vlmevalkit_rule",
    "vqa_punctuation",
    "yes_no_token_ids",
]
