"""Helpers for tests, demos and benchmarks: answer files as the questionnaire would export them."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .randomisation import participant_order, participant_seed
from .score import ANSWERS_FORMAT
from .spec import StudySpec

__all__ = ["answers_document", "write_answers"]


def answers_document(
    spec: StudySpec, participant_id: str, correct: Collection[str]
) -> dict[str, Any]:
    """The answer document a participant exports after answering exactly the questions with ids
    in ``correct`` correctly (and the others wrongly), in their seeded order.

    Args:
        spec: The study spec.
        participant_id: The id the participant typed.
        correct: Ids of the questions to answer correctly.

    Returns:
        A JSON-ready dict in the questionnaire's export format.

    >>> import tempfile
    >>> from jmllm.userstudy.example import write_example
    >>> from jmllm.userstudy.spec import load_spec
    >>> spec = load_spec(write_example(tempfile.mkdtemp()))
    >>> len(answers_document(spec, "P1", correct=["q1"])["answers"])
    5
    """
    flip = {"A1": "A2", "A2": "A1"}
    entries = []
    for shown in participant_order([q.id for q in spec.questions], spec.seed, participant_id):
        q = spec.question(shown.question_id)
        spec_choice = q.correct if q.id in correct else flip[q.correct]
        entries.append(
            {
                "position": shown.position,
                "question_id": shown.question_id,
                "swapped": shown.swapped,
                "choice": flip[spec_choice] if shown.swapped else spec_choice,
            }
        )
    return {
        "format": ANSWERS_FORMAT,
        "study_title": spec.title,
        "spec_fingerprint": spec.fingerprint(),
        "study_seed": spec.seed,
        "participant_id": participant_id,
        "participant_seed": participant_seed(spec.seed, participant_id),
        "started_at": "2024-01-01T00:00:00.000Z",
        "finished_at": "2024-01-01T00:05:00.000Z",
        "answers": entries,
    }


def write_answers(
    spec: StudySpec,
    out_dir: str | Path,
    participant_id: str,
    correct: Collection[str],
    file_name: str | None = None,
) -> Path:
    """Write :func:`answers_document` as ``answers-<participant_id>.json`` (or ``file_name``),
    with characters other than letters, digits, ``_`` and ``-`` replaced by ``_`` as the
    questionnaire does.

    Returns:
        The path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", participant_id)[:40]
    path = out / (file_name or f"answers-{safe}.json")
    atomic_write_text(path, json.dumps(answers_document(spec, participant_id, correct), indent=2))
    return path
