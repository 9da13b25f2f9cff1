"""The hallucination audit's answers and records: J's answer parsed, a run's result, and the
lines of ``results.jsonl`` (written per finished image, kept by a resume only for the same
settings, questions and image).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jmllm.align.files import read_jsonl
from jmllm.joint.audit.asking import AnsweredQuestion
from jmllm.joint.audit.dataset import AuditDataset, AuditError, AuditImage
from jmllm.joint.audit.questions import QuestionPlan
from jmllm.joint.audit.settings import AuditSettings

PARSE_RULES = ("authors", "strict", "pope")


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

_STRICT = re.compile(r"(yes|no)[.!]?", re.IGNORECASE)


def parse_answer(text: str | None, finished: bool = True, rule: str = "authors") -> str:
    """J's answer as ``"yes"``, ``"no"`` or ``"other"`` — counted, never guessed (except by
    the ``pope`` rule, which is POPE's own and never says ``"other"``).

    Rules:
        ``authors`` (default): ``text`` is exactly ``Yes`` or ``No``, nothing stripped — give
        it the raw reply (:attr:`AuditRecord.reply`, the text after ``ASSISTANT: `` as the
        authors' notebook splits it off and compares it with these two strings); so
        ``" Yes"`` and ``"No\\n"`` are ``"other"``, and so is None (no reply).
        ``strict``: the whole answer is yes or no in any case, optionally with a final ``.`` or
        ``!``.
        ``pope``: POPE's evaluation script: in the first sentence (up to the first ``.``, commas
        removed), a word ``no``, ``No`` or ``not`` means no, anything else yes.

    An answer cut by the token limit (``finished`` False) is ``"other"`` under ``authors`` and
    ``strict``: nobody knows how it would have gone on.

    Example:
        >>> parse_answer("Yes"), parse_answer("yes."), parse_answer("yes.", rule="strict")
        ('yes', 'other', 'yes')
        >>> parse_answer("No\\n"), parse_answer("No\\n", rule="strict")
        ('other', 'no')
        >>> parse_answer("There is no cat.", rule="pope")
        'no'
    """
    if rule not in PARSE_RULES:
        raise AuditError(f"parse rule: {rule!r} is not one of {', '.join(PARSE_RULES)}")
    if rule == "pope":
        if text is None:
            return "yes"  # POPE's rule: no "no" in it
        sentence = text.split(".")[0] if "." in text else text
        words = sentence.replace(",", "").split(" ")
        return "no" if {"No", "no", "not"} & set(words) else "yes"
    if text is None or not finished:
        return "other"
    if rule == "authors":
        return {"Yes": "yes", "No": "no"}.get(text, "other")
    match = _STRICT.fullmatch(text.strip())
    return match.group(1).lower() if match else "other"


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecord:
    """One answered question of the audit (a row of the report's data).

    Attributes:
        image_id, file: the image.
        class_name: the class asked about; present: whether it is annotated in the image.
        answer: J's answer text (stripped); tokens: its token ids; finished: ended with
            end-of-sequence.
        owl_score: OWL-ViT's maximum score for the class on the same ``t``.
        reply: the raw answer as the authors' notebook splits it off after ``ASSISTANT: ``
            (:attr:`jmllm.joint.JointAnswer.reply`; None: their split finds none).
    """

    image_id: str
    file: str
    class_name: str
    present: bool
    answer: str
    tokens: tuple[int, ...]
    finished: bool
    owl_score: float
    reply: str | None = None

    def parsed(self, rule: str = "authors") -> str:
        """``"yes"``, ``"no"`` or ``"other"`` (see :func:`parse_answer`): the ``authors`` rule
        reads the raw :attr:`reply`, the others the answer text."""
        return parse_answer(self.reply if rule == "authors" else self.answer, self.finished, rule)


@dataclass
class AuditResult:
    """What :func:`~jmllm.joint.audit.run.run_audit` produced.

    Attributes:
        settings: how J was asked; plan: which classes, per image.
        records: every answered question, in dataset and plan order.
        failed: image id → why it could not be audited (unreadable image …); retried on rerun.
        processed: images answered by this run (all processes); kept: finished before.
        out: the output folder, if any.
        dataset: the audited dataset (for the report's pictures).
    """

    settings: AuditSettings
    plan: QuestionPlan
    records: list[AuditRecord]
    failed: dict[str, str] = field(default_factory=dict)
    processed: int = 0
    kept: int = 0
    out: Path | None = None
    dataset: AuditDataset | None = None
    seconds: float = 0.0

    @property
    def images(self) -> int:
        """Images with answers."""
        return len({r.image_id for r in self.records})


def _record_line(
    image: AuditImage,
    answered: list[AnsweredQuestion],
    planned: list[Any],
    digest: str,
    fingerprint: str,
) -> dict[str, Any]:
    return {
        "image_id": image.image_id,
        "file": image.file,
        "sha256": fingerprint,  # resume keeps these answers only for the same image
        "settings": digest,
        "questions": [
            {
                "class": a.class_name,
                "present": q.present,
                "answer": a.answer.text,
                "reply": a.answer.reply,
                "tokens": [int(v) for v in a.answer.token_ids],
                "finished": bool(a.answer.finished),
                "owl_score": round(a.owl_score, 7),
            }
            for a, q in zip(answered, planned, strict=True)
        ],
    }


def _records_from_line(line: dict[str, Any]) -> list[AuditRecord]:
    return [
        AuditRecord(
            image_id=str(line["image_id"]),
            file=str(line.get("file", "")),
            class_name=str(q["class"]),
            present=bool(q["present"]),
            answer=str(q["answer"]),
            tokens=tuple(int(v) for v in q.get("tokens", ())),
            finished=bool(q["finished"]),
            owl_score=float(q["owl_score"]),
            # lines written before replies were recorded: the stripped text stands in
            reply=q["reply"] if "reply" in q else str(q["answer"]),
        )
        for q in line["questions"]
    ]


def _finished_lines(
    path: Path, digest: str, plan: QuestionPlan, fingerprints: _Fingerprints
) -> dict[str, dict[str, Any]]:
    """Records of ``results.jsonl`` that match the settings, the image's planned questions and
    the image itself (its file's SHA-256: an id pointed at another file is asked again); a later
    line for the same image wins."""
    found: dict[str, dict[str, Any]] = {}
    for line in read_jsonl(path):
        image_id = line.get("image_id")
        if not isinstance(image_id, str):
            continue
        planned = plan.questions.get(image_id)
        if line.get("settings") != digest or planned is None:
            continue
        try:
            asked = [(q["class"], bool(q["present"])) for q in line["questions"]]
            _records_from_line(line)
        except (KeyError, TypeError, ValueError):
            continue
        if asked != [(q.class_name, q.present) for q in planned]:
            continue
        if line.get("sha256") is None or line.get("sha256") != fingerprints.of(image_id):
            continue
        found[image_id] = line
    return found


class _Fingerprints:
    """The images' SHA-256, computed once per image when a resume needs it (None: unreadable)."""

    def __init__(self, images: Sequence[AuditImage]) -> None:
        self._images = {image.image_id: image for image in images}
        self._known: dict[str, str | None] = {}

    def remember(self, image_id: str, fingerprint: str) -> None:
        self._known[image_id] = fingerprint

    def of(self, image_id: str) -> str | None:
        if image_id not in self._known:
            image = self._images.get(image_id)
            try:
                self._known[image_id] = image.fingerprint() if image is not None else None
            except (OSError, ValueError):
                self._known[image_id] = None
        return self._known[image_id]


__all__ = [
    "PARSE_RULES",
    "AuditRecord",
    "AuditResult",
    "parse_answer",
]
