"""jmllm.userstudy: the user study of Giulivi & Boracchi (2024), supplementary §3, as a kit.

Each question shows one image and two GA explanations and asks which explanation is for which
of two objects (answers A1/A2). This package validates a question spec, renders it into one
self-contained HTML questionnaire (per-participant random order from a recorded seed), and scores
the exported answer files (share correct per question with Clopper-Pearson 95% intervals).

>>> import tempfile
>>> from jmllm.userstudy import load_spec, write_example, write_questionnaire
>>> root = tempfile.mkdtemp()
>>> write_questionnaire(load_spec(write_example(root)), root).name
'questionnaire.html'
"""

from __future__ import annotations

from typing import Any

from .example import write_example
from .randomisation import ShownQuestion, participant_order, participant_seed
from .render import render_questionnaire, write_questionnaire
from .spec import Question, SpecError, StudySpec, load_spec

__all__ = [
    "ParticipantScore",
    "Question",
    "QuestionScore",
    "Rate",
    "ShownQuestion",
    "SpecError",
    "StudyScore",
    "StudySpec",
    "SubmissionProblem",
    "load_spec",
    "participant_order",
    "participant_seed",
    "render_questionnaire",
    "score_answers",
    "write_example",
    "write_questionnaire",
    "write_results",
]

_LAZY = {
    # scipy and matplotlib are imported on first use, so importing the package stays light.
    "ParticipantScore": "score",
    "QuestionScore": "score",
    "Rate": "score",
    "StudyScore": "score",
    "SubmissionProblem": "score",
    "score_answers": "score",
    "write_results": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
