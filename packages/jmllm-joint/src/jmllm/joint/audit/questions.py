"""Question plans of the hallucination audit: which classes J is asked about per image, and the
question's text.

For every image, :func:`plan_questions` chooses which classes J is asked about:

``all`` (default, the authors' protocol)
    every present class (a "no" is a negative hallucination) and every absent class of the
    vocabulary (a "yes" is a positive hallucination): 80 questions per COCO image.
``random`` / ``popular`` / ``adversarial`` (POPE, Li et al., EMNLP 2023)
    images with at least ``k`` present classes; the first ``k`` present classes (annotation
    order) as positives and, for each, one absent class as a negative: drawn uniformly among the
    classes seen in the audited images (``random``, seeded per image), the most frequent such
    class (``popular``: by the number of audited images that contain it), or the class that
    co-occurs most often with that positive (``adversarial``); when no class is left by the
    frequency rules, a random one.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from jmllm.joint.audit.dataset import (
    AuditDataset,
    AuditError,
    AuditImage,  # noqa: F401 - the examples build images
)

SAMPLINGS = ("all", "random", "popular", "adversarial")
Sampling = Literal["all", "random", "popular", "adversarial"]


@dataclass(frozen=True)
class PlannedQuestion:
    """One question of the plan: a class and whether it is annotated in the image."""

    class_name: str
    present: bool


@dataclass
class QuestionPlan:
    """What J is asked about each image.

    Attributes:
        questions: image id → its questions, in asking order.
        sampling, k, seed: how they were chosen.
        excluded: ids of images left out (POPE: fewer than ``k`` present classes).
        short: ids of images that got fewer negatives than positives (no absent class left).
    """

    questions: dict[str, list[PlannedQuestion]]
    sampling: str
    k: int
    seed: int
    excluded: list[str] = field(default_factory=list)
    short: list[str] = field(default_factory=list)

    @property
    def num_questions(self) -> int:
        return sum(len(q) for q in self.questions.values())


# ---------------------------------------------------------------------------------------------
# Question plans
# ---------------------------------------------------------------------------------------------


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    # one stream per image: the plan of an image does not depend on the others, on their order
    # or on how the work is split between processes
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8"))])


def plan_questions(
    dataset: AuditDataset, sampling: Sampling | str = "all", k: int = 3, seed: int = 0
) -> QuestionPlan:
    """Which classes J is asked about, per image (see the module docstring).

    Args:
        dataset: the images and the class vocabulary.
        sampling: ``all`` (the authors' protocol), ``random``, ``popular`` or ``adversarial``.
        k: POPE: positives (and negatives) per image.
        seed: seed of the random choices (one stream per image).

    Returns:
        :class:`QuestionPlan`.

    Example:
        >>> ds = AuditDataset(("cat", "dog", "car"), (AuditImage("1", "a.jpg", ("cat",), "a.jpg"),))
        >>> [(q.class_name, q.present) for q in plan_questions(ds).questions["1"]]
        [('cat', True), ('dog', False), ('car', False)]
    """
    if sampling not in SAMPLINGS:
        raise AuditError(f"sampling: {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    if not isinstance(k, int) or k < 1:
        raise AuditError(f"k: must be a positive integer, got {k!r}")
    plan = QuestionPlan({}, sampling, k, seed)
    if sampling == "all":
        for image in dataset.images:
            present = list(image.present)
            absent = [c for c in dataset.classes if c not in image.present]
            plan.questions[image.image_id] = [PlannedQuestion(c, True) for c in present] + [
                PlannedQuestion(c, False) for c in absent
            ]
        return plan
    eligible = [image for image in dataset.images if len(image.present) >= k]
    plan.excluded = [image.image_id for image in dataset.images if len(image.present) < k]
    rank = {c: i for i, c in enumerate(dataset.classes)}

    def by_vocabulary(name: str) -> int:
        return rank.get(name, len(rank))

    frequency: Counter[str] = Counter()
    co_occurrence: dict[str, Counter[str]] = {}
    for image in eligible:
        frequency.update(image.present)
        for a in image.present:
            co_occurrence.setdefault(a, Counter()).update(b for b in image.present if b != a)
    pool = sorted(frequency, key=by_vocabulary)  # the classes seen in the audited images
    popular = sorted(pool, key=lambda c: (-frequency[c], by_vocabulary(c)))
    for image in eligible:
        rng = _image_rng(seed, image.image_id)
        asked: list[PlannedQuestion] = []
        used = set(image.present)
        for positive in image.present[:k]:
            asked.append(PlannedQuestion(positive, True))
            if sampling == "popular":
                ranked: Sequence[str] = popular
            elif sampling == "adversarial":
                partners = co_occurrence.get(positive, Counter())
                ranked = sorted(partners, key=lambda c: (-partners[c], by_vocabulary(c)))
            else:
                ranked = ()
            negative = next((c for c in ranked if c not in used), None)
            if negative is None:
                left = [c for c in pool if c not in used]
                negative = left[int(rng.integers(len(left)))] if left else None
            if negative is None:
                continue
            used.add(negative)
            asked.append(PlannedQuestion(negative, False))
        if sum(not q.present for q in asked) < k:
            plan.short.append(image.image_id)
        plan.questions[image.image_id] = asked
    return plan


AUTHORS_QUESTION = "Is there a {} in the image? Only answer with 'yes' or 'no'."
ARTICLES = ("a", "a-an")


def question_text(class_name: str, question: str = AUTHORS_QUESTION, articles: str = "a") -> str:
    """The question about ``class_name``.

    Args:
        class_name: the class, as the vocabulary names it.
        question: a format string with one ``{}``; default the authors' question.
        articles: ``a`` keeps the question as written (the authors ask "Is there a apple");
            ``a-an`` writes "an" before a vowel-initial class when the placeholder follows "a "
            (POPE's published questions).

    Example:
        >>> question_text("apple", articles="a-an")
        "Is there an apple in the image? Only answer with 'yes' or 'no'."
    """
    if articles not in ARTICLES:
        raise AuditError(f"articles: {articles!r} is not one of {', '.join(ARTICLES)}")
    vowel = bool(class_name) and class_name[0].lower() in "aeiou"
    if articles == "a-an" and vowel and " a {}" in question:
        question = question.replace(" a {}", " an {}", 1)
    return question.format(class_name)


__all__ = [
    "ARTICLES",
    "AUTHORS_QUESTION",
    "SAMPLINGS",
    "PlannedQuestion",
    "QuestionPlan",
    "plan_questions",
    "question_text",
]
