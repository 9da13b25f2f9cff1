"""How the hallucination audit asks: its settings (the authors' protocol by default), their digest
and the identity of J's weights.

A resumed audit keeps only records made with the same :func:`settings_digest`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from jmllm.align.options import check_template
from jmllm.align.preprocessing import PAPER_PREPROCESSING, get_preprocessing
from jmllm.joint.audit.dataset import AuditError
from jmllm.joint.audit.questions import ARTICLES, AUTHORS_QUESTION, SAMPLINGS
from jmllm.joint.chat.templates import PAPER_TEMPLATE, PromptError, get_template
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION, TokenizationError, check_tokenization

AUTHORS_QUERY_TEMPLATE = "{}"  # the authors query OWL-ViT with the bare class name
DEFAULT_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class AuditSettings:
    """How the audit asks (everything that changes an answer or a score).

    Defaults are the authors' protocol: every present and absent class, the ``paper``
    template with their token ids (``legacy``) on their pixels (``authors``), their question,
    OWL-ViT queried with the bare class name.
    """

    sampling: str = "all"  # all | random | popular | adversarial
    k: int = 3  # POPE: positives (and negatives) per image
    seed: int = 0  # POPE: seed of the random choices, one stream per image
    template: str = PAPER_TEMPLATE  # conversation template of the question
    question: str = AUTHORS_QUESTION  # with one {} for the class name
    articles: str = "a"  # a: as written (authors); a-an: "an" before vowels (POPE)
    query_template: str = AUTHORS_QUERY_TEMPLATE  # OWL-ViT query; "{}" is the bare name
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # a strict yes/no answer is a few tokens
    tokenization: str = (
        PAPER_TOKENIZATION  # legacy: the authors' ids (jmllm.joint.chat.tokenization)
    )
    preprocessing: str = PAPER_PREPROCESSING  # authors: their pixels (jmllm.align.preprocessing)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise AuditError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise AuditError(f"k: must be a positive integer, got {self.k!r}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 4096:
            raise AuditError(f"max_new_tokens: must be in 1..4096, got {self.max_new_tokens!r}")
        try:  # one bare {} and nothing else to fill (the project's template rule)
            check_template(self.question, "question")
            check_template(self.query_template, "query template")
        except ValueError as exc:
            raise AuditError(str(exc)) from None
        if self.articles not in ARTICLES:
            raise AuditError(f"articles: {self.articles!r} is not one of {', '.join(ARTICLES)}")
        try:
            get_template(self.template)
            check_tokenization(self.tokenization)
            get_preprocessing(self.preprocessing)
        except (PromptError, TokenizationError, ValueError) as exc:
            raise AuditError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies J's weights in a run's settings: its sources and dtype."""
    return {"sources": dict(getattr(model, "sources", {}) or {}), "dtype": str(model.dtype)}


_model_identity = model_identity  # the former private name


def settings_digest(settings: AuditSettings, model: Any) -> str:
    """A short hash of the settings and the model identity: records made otherwise are not
    reused on resume."""
    doc = {"settings": settings.to_dict(), "model": _model_identity(model)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "AUTHORS_QUERY_TEMPLATE",
    "DEFAULT_MAX_NEW_TOKENS",
    "AuditSettings",
    "model_identity",
    "settings_digest",
]
