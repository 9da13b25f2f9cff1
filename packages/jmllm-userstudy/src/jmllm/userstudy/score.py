"""Score a folder of answer files against the spec.

Each answer file (``*.json``, as exported by the questionnaire) records what the participant saw
(question order and explanation swaps) and what they chose (A1/A2 *as shown*). Scoring:

1. rejects files that are unreadable (too large, not UTF-8, not JSON, nested too deeply), not
   answer files, or made for another spec (fingerprint) — each file on its own: one bad file
   never stops the scoring of the others;
2. recomputes the participant's order from the study seed and participant id and rejects files
   whose recorded seed or order differ (``tampered``);
3. sets aside incomplete files and duplicates: files whose participant ids have the same normal
   form (:func:`~jmllm.userstudy.participants.normalise_participant_id`: ``"P01 "``, ``"p01"``
   and ``"Ｐ０１"`` are one participant) are one participant's; exact copies are scored once,
   files that disagree are all set aside as ``conflicting-duplicate``;
4. maps every shown choice back to the spec (a swapped question flips A1 and A2, and so does a
   pair the page holds in the other order, :attr:`~jmllm.userstudy.spec.Question.page_flipped`)
   and counts correct answers per question, per participant and overall, each with a
   Clopper-Pearson 95% interval.

Nothing set aside is scored; every such file is listed in :attr:`StudyScore.problems`.

Answer formats: ``jmllm-userstudy-answers/2`` (this questionnaire: ``swapped`` is relative to the
page's order of each pair) and ``jmllm-userstudy-answers/1`` (earlier questionnaires, whose pages
held each pair in spec order: ``swapped`` is relative to the spec).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import binomtest

from .participants import normalise_participant_id, problem_with_participant_id
from .randomisation import participant_order, participant_seed
from .spec import ANSWERS, StudySpec, accepted_fingerprints

__all__ = [
    "ANSWERS_FORMAT",
    "ANSWERS_FORMATS",
    "MAX_ANSWERS_BYTES",
    "PROBLEM_KINDS",
    "ParticipantScore",
    "QuestionScore",
    "Rate",
    "StudyScore",
    "SubmissionProblem",
    "read_answers_document",
    "score_answers",
]

log = logging.getLogger(__name__)

ANSWERS_FORMAT = "jmllm-userstudy-answers/2"  # what the questionnaire writes
LEGACY_ANSWERS_FORMAT = "jmllm-userstudy-answers/1"  # pages that held each pair in spec order
ANSWERS_FORMATS = (ANSWERS_FORMAT, LEGACY_ANSWERS_FORMAT)
PROBLEM_KINDS = (
    "unreadable",
    "not-answers",
    "foreign-spec",
    "tampered",
    "incomplete",
    "duplicate",
    "conflicting-duplicate",
)
MAX_ANSWERS_BYTES = 1_000_000  # an answer file is a few kB; anything far larger is not one
# An answers document is 3 levels deep; far deeper is not one (and recursion must not decide).
_MAX_JSON_DEPTH = 32


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
    participant_id: str  # normalised
    spec_choices: dict[str, str]  # question id -> choice mapped back to the spec's A1/A2


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (strings skipped)."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def read_answers_document(data: bytes) -> dict[str, Any] | tuple[str, str]:
    """Parse the bytes of one answer file or submission.

    Used by scoring and by the collection server alike, so that both refuse the same inputs
    the same way: nothing in the bytes can make either fail as a whole.

    Returns:
        The document, or ``(kind, detail)`` with a :data:`PROBLEM_KINDS` kind when the bytes are
        too large, not UTF-8 JSON, nested deeper than an answers document can be, or not an
        answers document.

    >>> read_answers_document(b"[" * 100_000 + b"]" * 100_000)
    ('unreadable', 'JSON nested deeper than 32 levels')
    >>> read_answers_document(b'{"format": "x"}')[0]
    'not-answers'
    """
    if len(data) > MAX_ANSWERS_BYTES:
        return "not-answers", f"larger than {MAX_ANSWERS_BYTES} bytes"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "unreadable", "not valid UTF-8 JSON (UnicodeDecodeError)"
    if _json_depth_exceeds(text, _MAX_JSON_DEPTH):
        return "unreadable", f"JSON nested deeper than {_MAX_JSON_DEPTH} levels"
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return "unreadable", f"not valid UTF-8 JSON ({exc.__class__.__name__})"
    if not isinstance(doc, dict) or doc.get("format") not in ANSWERS_FORMATS:
        return "not-answers", f"no 'format': {ANSWERS_FORMAT!r} field"
    return doc


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
    fingerprints = accepted_fingerprints(spec)  # the spec's, and its previous default's
    fingerprint = fingerprints[0]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file())
    problems: list[SubmissionProblem] = []
    by_participant: dict[str, list[_Submission]] = {}
    for path in files:
        checked = _check_file(path, spec, fingerprints)
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


def _check_file(
    path: Path, spec: StudySpec, fingerprints: tuple[str, ...]
) -> _Submission | SubmissionProblem:
    fingerprint = fingerprints[0]
    name = path.name

    def problem(kind: str, detail: str, pid: str | None = None) -> SubmissionProblem:
        return SubmissionProblem(name, pid, kind, detail)

    try:
        if path.stat().st_size > MAX_ANSWERS_BYTES:
            return problem("not-answers", f"larger than {MAX_ANSWERS_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        return problem("unreadable", f"cannot be read ({exc.strerror or exc.__class__.__name__})")
    doc = read_answers_document(data)
    if isinstance(doc, tuple):
        return problem(*doc)
    raw_pid = doc.get("participant_id")
    pid = normalise_participant_id(raw_pid) if isinstance(raw_pid, str) else None
    if doc.get("spec_fingerprint") not in fingerprints:
        theirs = str(doc.get("spec_fingerprint"))[:12]
        return problem(
            "foreign-spec",
            f"answers are for spec {theirs}…, this spec is {fingerprint[:12]}…",
            pid or None,
        )
    why = problem_with_participant_id(raw_pid)
    if why is not None:
        return problem("tampered", why, pid or None)
    assert isinstance(raw_pid, str) and pid
    # The order derives from the id exactly as recorded (the questionnaire records its
    # normalised form; older ones recorded the id as typed).
    if doc.get("study_seed") != spec.seed or doc.get("participant_seed") != participant_seed(
        spec.seed, raw_pid
    ):
        return problem("tampered", "seed does not match the study seed and participant id", pid)

    expected = participant_order([q.id for q in spec.questions], spec.seed, raw_pid)
    answers = doc.get("answers")
    if not isinstance(answers, list) or len(answers) != len(expected):
        return problem("tampered", f"expected {len(expected)} answer entries", pid)
    legacy = doc.get("format") == LEGACY_ANSWERS_FORMAT
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
        # The participant's A1/A2 refers to the explanations as shown: "swapped" shows the page's
        # pair reversed, and the page may hold the spec's pair reversed (page_flipped).
        flipped = shown.swapped != (not legacy and spec.question(shown.question_id).page_flipped)
        spec_choices[shown.question_id] = _flip(choice) if flipped else choice
    if unanswered:
        return problem(
            "incomplete", f"{len(expected) - unanswered} of {len(expected)} questions answered", pid
        )
    return _Submission(name, pid, spec_choices)


def _flip(choice: str) -> str:
    return "A2" if choice == "A1" else "A1"
