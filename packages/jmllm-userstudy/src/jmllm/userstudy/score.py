"""Score a folder of answer files against the spec.

Each answer file (``*.json``, as exported by the questionnaire) records what the participant saw
(question order and explanation swaps) and what they chose (A1/A2 *as shown*). Scoring:

1. rejects files that are unreadable, not answer files, or made for another spec (fingerprint);
2. recomputes the participant's order from the study seed and participant id and rejects files
   whose recorded seed or order differ (``tampered``);
3. sets aside incomplete files and duplicates (several complete files for one participant: exact
   copies are scored once; files that disagree are all set aside as ``conflicting-duplicate``);
4. maps every shown choice back to the spec (a swapped question flips A1 and A2) and counts
   correct answers per question, per participant and overall, each with a Clopper-Pearson 95%
   interval.

Nothing set aside is scored; every such file is listed in :attr:`StudyScore.problems`.
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import binomtest

from .randomisation import participant_order, participant_seed
from .spec import ANSWERS, StudySpec

__all__ = [
    "ANSWERS_FORMAT",
    "PROBLEM_KINDS",
    "ParticipantScore",
    "QuestionScore",
    "Rate",
    "StudyScore",
    "SubmissionProblem",
    "score_answers",
]

log = logging.getLogger(__name__)

ANSWERS_FORMAT = "jmllm-userstudy-answers/1"
PROBLEM_KINDS = (
    "unreadable",
    "not-answers",
    "foreign-spec",
    "tampered",
    "incomplete",
    "duplicate",
    "conflicting-duplicate",
)
_MAX_FILE_BYTES = 1_000_000  # an answer file is a few kB; anything far larger is not one


@dataclass(frozen=True)
class Rate:
    """A share of correct answers with its Clopper-Pearson 95% interval.

    Attributes:
        correct: Number of correct answers.
        total: Number of answers.
        share: ``correct / total`` (NaN when ``total`` is 0).
        ci_low: Lower end of the exact 95% interval (NaN when ``total`` is 0).
        ci_high: Upper end of the exact 95% interval (NaN when ``total`` is 0).
    """

    correct: int
    total: int
    share: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, correct: int, total: int) -> Rate:
        """The rate of ``correct`` out of ``total``.

        >>> r = Rate.of(5, 7)
        >>> round(r.share, 3), round(r.ci_low, 3), round(r.ci_high, 3)
        (0.714, 0.29, 0.963)
        """
        if total == 0:
            return cls(0, 0, math.nan, math.nan, math.nan)
        ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="exact")
        return cls(correct, total, correct / total, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class QuestionScore:
    """Correct answers to one question over all scored submissions."""

    question_id: str
    objects: tuple[str, str]
    correct_answer: str
    rate: Rate
    reference_share_correct: float | None


@dataclass(frozen=True)
class ParticipantScore:
    """Correct answers of one participant (one scored submission)."""

    participant_id: str
    file: str
    rate: Rate


@dataclass(frozen=True)
class SubmissionProblem:
    """An answer file that was not scored, and why.

    Attributes:
        file: File name inside the answers folder.
        participant_id: The participant id it claims, if it could be read.
        kind: One of :data:`PROBLEM_KINDS`.
        detail: One line for a person.
    """

    file: str
    participant_id: str | None
    kind: str
    detail: str


@dataclass(frozen=True)
class StudyScore:
    """Everything :func:`score_answers` found."""

    title: str
    spec_fingerprint: str
    files_read: int
    questions: tuple[QuestionScore, ...]
    participants: tuple[ParticipantScore, ...]
    overall: Rate
    problems: tuple[SubmissionProblem, ...] = field(default=())


@dataclass
class _Submission:
    file: str
    participant_id: str
    spec_choices: dict[str, str]  # question id -> choice mapped back to the spec's A1/A2


def score_answers(spec: StudySpec, answers_dir: str | Path) -> StudyScore:
    """Score every ``*.json`` answer file in ``answers_dir`` against ``spec``.

    Args:
        spec: The validated spec the questionnaire was rendered from.
        answers_dir: Folder of answer files (not searched recursively).

    Returns:
        A :class:`StudyScore`; files that could not be scored are in ``problems``.

    Raises:
        FileNotFoundError: ``answers_dir`` is not a folder.

    >>> import tempfile
    >>> from jmllm.userstudy.example import write_example
    >>> from jmllm.userstudy.spec import load_spec
    >>> from jmllm.userstudy.testing import write_answers
    >>> root = tempfile.mkdtemp()
    >>> spec = load_spec(write_example(root))
    >>> _ = write_answers(spec, f"{root}/answers", "P1", correct={"q1", "q2"})
    >>> result = score_answers(spec, f"{root}/answers")
    >>> result.overall.correct, result.overall.total
    (2, 5)
    """
    folder = Path(answers_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: answers folder not found")
    fingerprint = spec.fingerprint()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file())
    problems: list[SubmissionProblem] = []
    by_participant: dict[str, list[_Submission]] = {}
    for path in files:
        checked = _check_file(path, spec, fingerprint)
        if isinstance(checked, SubmissionProblem):
            problems.append(checked)
        else:
            by_participant.setdefault(checked.participant_id, []).append(checked)

    scored: list[_Submission] = []
    for pid, subs in by_participant.items():
        if len(subs) == 1:
            scored.append(subs[0])
        elif all(s.spec_choices == subs[0].spec_choices for s in subs):
            scored.append(subs[0])
            problems += [
                SubmissionProblem(
                    s.file, pid, "duplicate", f"same answers as {subs[0].file}; scored once"
                )
                for s in subs[1:]
            ]
        else:
            others = ", ".join(s.file for s in subs)
            problems += [
                SubmissionProblem(
                    s.file,
                    pid,
                    "conflicting-duplicate",
                    f"participant has {len(subs)} files with different answers ({others}); none scored",
                )
                for s in subs
            ]

    scored.sort(key=lambda s: s.file)
    questions = []
    for q in spec.questions:
        hits = sum(s.spec_choices[q.id] == q.correct for s in scored)
        questions.append(
            QuestionScore(
                q.id, q.objects, q.correct, Rate.of(hits, len(scored)), q.reference_share_correct
            )
        )
    participants = []
    for s in scored:
        hits = sum(s.spec_choices[q.id] == q.correct for q in spec.questions)
        participants.append(
            ParticipantScore(s.participant_id, s.file, Rate.of(hits, len(spec.questions)))
        )
    overall = Rate.of(sum(p.rate.correct for p in participants), len(scored) * len(spec.questions))
    problems.sort(key=lambda p: (p.file, p.kind))
    log.info("scored %d of %d answer files; %d set aside", len(scored), len(files), len(problems))
    return StudyScore(
        title=spec.title,
        spec_fingerprint=fingerprint,
        files_read=len(files),
        questions=tuple(questions),
        participants=tuple(participants),
        overall=overall,
        problems=tuple(problems),
    )


def _check_file(path: Path, spec: StudySpec, fingerprint: str) -> _Submission | SubmissionProblem:
    name = path.name

    def problem(kind: str, detail: str, pid: str | None = None) -> SubmissionProblem:
        return SubmissionProblem(name, pid, kind, detail)

    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return problem("not-answers", f"larger than {_MAX_FILE_BYTES} bytes")
        doc: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return problem("unreadable", f"not valid UTF-8 JSON ({exc.__class__.__name__})")
    if not isinstance(doc, dict) or doc.get("format") != ANSWERS_FORMAT:
        return problem("not-answers", f"no 'format': {ANSWERS_FORMAT!r} field")
    pid = doc.get("participant_id")
    pid = pid if isinstance(pid, str) and pid else None
    if doc.get("spec_fingerprint") != fingerprint:
        theirs = str(doc.get("spec_fingerprint"))[:12]
        return problem(
            "foreign-spec",
            f"answers are for spec {theirs}…, this spec is {fingerprint[:12]}…",
            pid,
        )
    if pid is None:
        return problem("tampered", "missing participant_id")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in pid):
        return problem("tampered", f"participant_id {pid!r} has control or invalid characters")
    if doc.get("study_seed") != spec.seed or doc.get("participant_seed") != participant_seed(
        spec.seed, pid
    ):
        return problem("tampered", "seed does not match the study seed and participant id", pid)

    expected = participant_order([q.id for q in spec.questions], spec.seed, pid)
    answers = doc.get("answers")
    if not isinstance(answers, list) or len(answers) != len(expected):
        return problem("tampered", f"expected {len(expected)} answer entries", pid)
    spec_choices: dict[str, str] = {}
    unanswered = 0
    for shown, entry in zip(expected, answers, strict=True):
        if not isinstance(entry, dict) or (
            entry.get("position"),
            entry.get("question_id"),
            entry.get("swapped"),
        ) != (shown.position, shown.question_id, shown.swapped):
            return problem(
                "tampered", f"position {shown.position} does not match the seeded order", pid
            )
        choice = entry.get("choice")
        if choice is None:
            unanswered += 1
            continue
        if choice not in ANSWERS:
            return problem("tampered", f"position {shown.position}: invalid choice {choice!r}", pid)
        # The participant's A1/A2 refers to the explanations as shown; swapped shows them reversed.
        spec_choices[shown.question_id] = _flip(choice) if shown.swapped else choice
    if unanswered:
        return problem(
            "incomplete", f"{len(expected) - unanswered} of {len(expected)} questions answered", pid
        )
    return _Submission(name, pid, spec_choices)


def _flip(choice: str) -> str:
    return "A2" if choice == "A1" else "A1"
