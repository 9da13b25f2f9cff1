"""Question spec of the user study (supplementary §3 of Giulivi & Boracchi 2024).

Every question shows one image and two GA explanations of it, and asks which explanation is for
which of two objects. The spec is a YAML (or JSON, a subset of YAML) file::

    title: GA explanations user study
    seed: 2024                       # study seed: each participant's order derives from it
    instructions: |                  # optional; plain text, blank lines separate paragraphs
      ...
    questions:
      - id: q1                       # optional, default q<N>; letters, digits, . _ -
        image: images/q1.png         # paths are relative to the spec file
        objects: [cat, TV/monitor]   # object 1 and object 2 of the question text
        explanations: [images/q1_e1.png, images/q1_e2.png]   # Explanation 1 and Explanation 2
        correct: A1                  # A1: Explanation 1 explains object 1 and 2 explains object 2
        reference_share_correct: 1.0 # optional: a published rate, shown beside ours in reports

Loading validates everything (types, unknown keys, unique ids, readable images) and raises
:class:`SpecError` with one line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from .conventions import (
    ImageLoadError,
    UnsafePathError,
    UsageError,
    clip,
    open_image,
    resolve_inside,
)

__all__ = [
    "ANSWERS",
    "DEFAULT_INSTRUCTIONS",
    "SPEC_FORMAT",
    "Question",
    "SpecError",
    "StudySpec",
    "accepted_fingerprints",
    "answer_text",
    "load_spec",
    "question_text",
]

SPEC_FORMAT = "jmllm-userstudy-spec/1"
ANSWERS = ("A1", "A2")

DEFAULT_INSTRUCTIONS = (
    "Each question shows an image and two explanations of what a vision model perceived in it. "
    "Each explanation highlights the parts of the image that support one object.\n\n"
    "For every question, decide which explanation is for which object and pick one of the two "
    "answers. There are no trick questions; if unsure, give your best guess.\n\n"
    "When you have answered every question, the last page shows how to return your answers to "
    "the researcher."
)
# The default wording before it stopped naming one way back (a served questionnaire has a Send
# button, a file has a Download button: the last page says which). Answers collected under it
# still score against a spec that uses the default (StudySpec.accepted_fingerprints).
PREVIOUS_DEFAULT_INSTRUCTIONS = (
    "Each question shows an image and two explanations of what a vision model perceived in it. "
    "Each explanation highlights the parts of the image that support one object.\n\n"
    "For every question, decide which explanation is for which object and pick one of the two "
    "answers. There are no trick questions; if unsure, give your best guess.\n\n"
    "When you have answered every question, download your answers and send the file to the "
    "researcher."
)

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOP_KEYS = {"title", "seed", "instructions", "questions"}
_QUESTION_KEYS = {"id", "image", "objects", "explanations", "correct", "reference_share_correct"}
_MAX_TEXT = 200  # object names and titles longer than this are a spec mistake, not a label


class SpecError(UsageError):
    """A study spec that cannot be used; the message names the file and the field."""


_Fail = Callable[[str, str], SpecError]  # (field, problem) -> the error to raise


def question_text(objects: tuple[str, str]) -> str:
    """The question as the paper words it.

    >>> question_text(("cat", "TV/monitor"))
    'Which explanation is for object "cat" and which is for object "TV/monitor"?'
    """
    return f'Which explanation is for object "{objects[0]}" and which is for object "{objects[1]}"?'


def answer_text(answer: str, objects: tuple[str, str]) -> str:
    """The text of answer ``A1`` or ``A2`` for the question about ``objects``, as in the paper.

    >>> answer_text("A2", ("person", "horse"))
    'Explanation 1 explains "horse" and Explanation 2 explains "person"'
    """
    first, second = objects if answer == "A1" else (objects[1], objects[0])
    return f'Explanation 1 explains "{first}" and Explanation 2 explains "{second}"'


@dataclass(frozen=True)
class Question:
    """One question of the study, with its files resolved to absolute paths.

    Attributes:
        id: Stable identifier, used in answer files and reports.
        image: The image both explanations are about.
        objects: Object 1 and object 2, in the order the question text names them.
        explanations: Explanation 1 and Explanation 2 as the spec lists them (participants may see
            them swapped; answer files record it and scoring maps it back).
        correct: ``"A1"`` when explanation 1 is for object 1, ``"A2"`` otherwise.
        reference_share_correct: Optional published share of correct answers (0..1).
    """

    id: str
    image: Path
    objects: tuple[str, str]
    explanations: tuple[Path, Path]
    correct: str
    reference_share_correct: float | None = None

    @cached_property
    def page_flipped(self) -> bool:
        """Whether the questionnaire page holds explanation 2 before explanation 1.

        The page orders each pair of explanations by the SHA-256 of the files' bytes, not as the
        spec lists them: spec authors (and :func:`jmllm.userstudy.from_joint.write_explanations`)
        tend to list the explanation of object 1 first, and a participant reading the page's
        source must not learn the answer from that order. Scoring maps answers back through it.
        """
        first, second = (_sha256_file(p) for p in self.explanations)
        return second < first

    def page_explanations(self) -> tuple[Path, Path]:
        """The two explanation files in the order the page embeds them (see :attr:`page_flipped`)."""
        first, second = self.explanations
        return (second, first) if self.page_flipped else (first, second)


@dataclass(frozen=True)
class StudySpec:
    """A validated study: texts, seed and questions.

    Attributes:
        path: The spec file it was loaded from.
        title: Shown at the top of the questionnaire and the reports.
        seed: Study seed; each participant's question and explanation order derives from it and
            the participant id (:mod:`jmllm.userstudy.randomisation`).
        instructions: Plain text shown before the first question.
        questions: The questions in spec order.
    """

    path: Path
    title: str
    seed: int
    instructions: str
    questions: tuple[Question, ...]

    def question(self, question_id: str) -> Question:
        """The question with id ``question_id`` (``KeyError`` if none)."""
        for q in self.questions:
            if q.id == question_id:
                return q
        raise KeyError(question_id)

    def fingerprint(self, instructions: str | None = None) -> str:
        """SHA-256 over everything a participant sees and scoring uses (texts, seed, ids,
        objects, correct answers and the bytes of every image), but not reference rates.

        Answer files carry it, so answers collected for another spec (or for an edited one) are
        detected rather than scored.

        Args:
            instructions: the instructions to hash instead of the spec's own (None: its own).
        """
        payload = {
            "format": SPEC_FORMAT,
            "title": self.title,
            "seed": self.seed,
            "instructions": self.instructions if instructions is None else instructions,
            "questions": [
                {
                    "id": q.id,
                    "objects": list(q.objects),
                    "correct": q.correct,
                    "image": _sha256_file(q.image),
                    "explanations": [_sha256_file(p) for p in q.explanations],
                }
                for q in self.questions
            ],
        }
        canonical = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def accepted_fingerprints(spec: StudySpec) -> tuple[str, ...]:
    """The fingerprints an answer file for ``spec`` may carry: :meth:`StudySpec.fingerprint`,
    and, for a spec on the default instructions, the fingerprint the same spec had under
    :data:`PREVIOUS_DEFAULT_INSTRUCTIONS` — only the default's wording about returning answers
    changed, so answers collected before are for the same study.

    >>> len(accepted_fingerprints(load_spec(example)))  # doctest: +SKIP
    2
    """
    current = spec.fingerprint()
    if spec.instructions != DEFAULT_INSTRUCTIONS.strip():
        return (current,)
    return (current, spec.fingerprint(PREVIOUS_DEFAULT_INSTRUCTIONS.strip()))


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec (YAML or JSON).

    Args:
        path: The spec file; image paths inside it are relative to its folder.

    Returns:
        The validated :class:`StudySpec`.

    Raises:
        SpecError: One line naming the file, the field and the problem.

    >>> from jmllm.userstudy.example import write_example
    >>> import tempfile
    >>> spec = load_spec(write_example(tempfile.mkdtemp()))
    >>> [q.correct for q in spec.questions]
    ['A1', 'A2', 'A2', 'A1', 'A1']
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"{path}: not valid YAML/JSON: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise SpecError(f"{path}: not valid YAML/JSON{where}: {problem}") from None
    return _parse(data, path)


def _parse(data: Any, path: Path) -> StudySpec:
    def fail(field: str, problem: str) -> SpecError:
        return SpecError(f"{path}: {field}: {problem}")

    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (expected one of {sorted(_TOP_KEYS)})")

    title = _text(data.get("title", "User study"), "title", fail)
    seed = data.get("seed")
    if seed is None:
        raise fail("seed", "missing (an integer that makes participant orders reproducible)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**53:
        raise fail("seed", f"must be an integer between 0 and 2**53 - 1, got {seed!r}")
    instructions = data.get("instructions", DEFAULT_INSTRUCTIONS)
    if not isinstance(instructions, str) or not instructions.strip():
        raise fail("instructions", "must be non-empty text")

    raw_questions = data.get("questions")
    if not isinstance(raw_questions, list) or not raw_questions:
        raise fail("questions", "missing or empty (a list of questions)")
    questions = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_questions):
        q = _parse_question(raw, index, path.parent, fail)
        if q.id in seen:
            raise fail(f"questions[{index}].id", f"duplicate id {q.id!r}")
        seen.add(q.id)
        questions.append(q)
    return StudySpec(
        path=path.resolve(),
        title=title,
        seed=seed,
        instructions=instructions.strip(),
        questions=tuple(questions),
    )


def _text(value: Any, field: str, fail: _Fail) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(field, f"must be non-empty text, got {value!r}")
    if len(value) > _MAX_TEXT:
        raise fail(field, f"longer than {_MAX_TEXT} characters")
    return value.strip()


def _parse_question(raw: Any, index: int, root: Path, fail: _Fail) -> Question:
    where = f"questions[{index}]"
    if not isinstance(raw, dict):
        raise fail(where, "must be a mapping")
    unknown = sorted(set(map(str, raw)) - _QUESTION_KEYS)
    if unknown:
        raise fail(
            f"{where}.{unknown[0]}", f"unknown key (expected one of {sorted(_QUESTION_KEYS)})"
        )
    for key in ("image", "objects", "explanations", "correct"):
        if key not in raw:
            raise fail(f"{where}.{key}", "missing")

    qid = raw.get("id", f"q{index + 1}")
    if not isinstance(qid, str) or not _ID_RE.match(qid):
        raise fail(f"{where}.id", f"must be 1-64 letters, digits, '.', '_' or '-', got {qid!r}")

    objects = raw["objects"]
    if not isinstance(objects, list) or len(objects) != 2:
        raise fail(f"{where}.objects", "must be a list of exactly two object names")
    pair = (
        _text(objects[0], f"{where}.objects[0]", fail),
        _text(objects[1], f"{where}.objects[1]", fail),
    )
    if pair[0] == pair[1]:
        raise fail(f"{where}.objects", f"the two objects are the same ({pair[0]!r})")

    explanations = raw["explanations"]
    if not isinstance(explanations, list) or len(explanations) != 2:
        raise fail(f"{where}.explanations", "must be a list of exactly two image files")
    image = _image_file(raw["image"], root, f"{where}.image", fail)
    expl = (
        _image_file(explanations[0], root, f"{where}.explanations[0]", fail),
        _image_file(explanations[1], root, f"{where}.explanations[1]", fail),
    )

    correct = raw["correct"]
    if correct not in ANSWERS:
        raise fail(f"{where}.correct", f"must be 'A1' or 'A2', got {correct!r}")

    reference = raw.get("reference_share_correct")
    if reference is not None and (
        isinstance(reference, bool)
        or not isinstance(reference, int | float)
        or not 0 <= reference <= 1
    ):
        raise fail(
            f"{where}.reference_share_correct", f"must be a number in [0, 1], got {reference!r}"
        )
    return Question(
        id=qid,
        image=image,
        objects=pair,
        explanations=expl,
        correct=correct,
        reference_share_correct=None if reference is None else float(reference),
    )


def _image_file(value: Any, root: Path, field: str, fail: _Fail) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise fail(field, f"must be a file path, got {clip(repr(value))}")
    try:  # beside the spec: no absolute path, no "..", no link that leads out of its folder
        path = resolve_inside(root, value, "path").resolve()
    except UnsafePathError as exc:
        raise fail(field, str(exc).removeprefix("path ")) from None
    if not path.is_file():
        raise fail(field, f"image file not found: {value} (looked at {path})")
    try:
        # the pixel limit is checked from the header first: a bomb is refused undecoded
        open_image(path, name=value).close()
    except ImageLoadError as exc:
        detail = str(exc).removeprefix(f"{value}: ")
        if detail.startswith("not a readable image"):
            detail = (
                f"not a readable image: {value} ({detail.removeprefix('not a readable image (')}"
            )
        raise fail(field, detail) from None
    return path
