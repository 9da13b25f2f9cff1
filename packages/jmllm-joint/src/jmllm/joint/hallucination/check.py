"""Hallucination view: does O^OWL see, in the same embedding ``t``, what the answer mentions?
(DESIGN §1.4; the supplementary material's Figures 1–4 are the kind of output.)

For one answer of J:

1. the **object words** it mentions are picked — from a user list when given, otherwise by a
   simple rule: words (or two-word phrases) that are COCO category names, singular or with a
   plural ``s``/``es`` (:data:`COCO_OBJECTS`);
2. every mentioned object, plus any extra query the user lists, is queried in O^OWL on the same
   ``t``; its detection score is the best sigmoid class score over the patches;
3. each mentioned object gets its GA map (class channel of its own query; one norm computation for
   the whole query set);
4. the report lists *mentioned but not detected* (score < threshold: questionable words) and
   *detected but not mentioned* (extra queries above the threshold).

Its page (:mod:`jmllm.joint.hallucination.page`) shows the conversation with the questionable
words highlighted in red (detected ones in green) and the detections beside it; clicking a word
shows its GA map and its best box.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE, ConversationTemplate
from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
from jmllm.joint.saliency import GAResult, GradientAlignment

COCO_OBJECTS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


@dataclass(frozen=True)
class MentionedObject:
    """An object phrase of the answer: its canonical name and character span."""

    name: str
    text: str
    start: int
    end: int


def _plural_forms(name: str) -> list[str]:
    last = name.split()[-1]
    forms = [name, name[: -len(last)] + last + "s"]
    if last.endswith(("s", "x", "ch", "sh")):
        forms.append(name[: -len(last)] + last + "es")
    if last.endswith("y"):
        forms.append(name[: -len(last)] + last[:-1] + "ies")
    if last == "person":
        forms.append(name[: -len(last)] + "people")
    return forms


def object_mentions(text: str, vocabulary: Sequence[str] | None = None) -> list[MentionedObject]:
    """Object phrases of ``text`` from ``vocabulary`` (default :data:`COCO_OBJECTS`).

    Matching is case-insensitive on whole words, singular or plural (``s``, ``es``, ``y``→``ies``,
    person→people); longer names win (``teddy bear`` before ``bear``).

    Example:
        >>> [m.name for m in object_mentions("Two dogs sit near a teddy bear.")]
        ['dog', 'teddy bear']
    """
    names = [v.strip().lower() for v in (vocabulary or COCO_OBJECTS) if v and v.strip()]
    patterns = []
    for name in sorted(set(names), key=len, reverse=True):
        for form in _plural_forms(name):
            patterns.append((re.compile(rf"(?<![\w-]){re.escape(form)}(?![\w-])", re.I), name))
    taken: list[tuple[int, int]] = []
    found = []
    for pattern, name in patterns:
        for m in pattern.finditer(text):
            if any(m.start() < e and m.end() > s for s, e in taken):
                continue
            taken.append((m.start(), m.end()))
            found.append(MentionedObject(name, m.group(), m.start(), m.end()))
    return sorted(found, key=lambda o: o.start)


@dataclass
class ObjectCheck:
    """One queried object: mentioned or not, its detection score and best box, its GA map."""

    name: str
    mentioned: bool
    score: float
    box: list[float]  # best patch's box, x0, y0, x1, y1 pixels of the original image
    detected: bool
    ga: GAResult | None = None  # the GA of the first mention (mentioned objects only)


@dataclass
class HallucinationReport:
    """The hallucination view of one answer.

    Attributes:
        prompt, answer_text: the exchange.
        mentions: every object phrase found in the answer.
        objects: name → :class:`ObjectCheck` for mentioned objects and extra queries.
        threshold: detection score threshold.
        image: the RGB image (None if explained from ``t``); image_size: (width, height).
        template: the conversation template the prompt was put in; tokenization: how it was
            tokenised; preprocessing: how the image was embedded (None from ``t``).
    """

    prompt: str
    answer_text: str
    mentions: list[MentionedObject]
    objects: dict[str, ObjectCheck]
    threshold: float
    image: Any
    image_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)
    template: str = INTERACTIVE_TEMPLATE
    tokenization: str = INTERACTIVE_TOKENIZATION
    preprocessing: str | None = INTERACTIVE_PREPROCESSING

    @property
    def mentioned_not_detected(self) -> list[str]:
        return [o.name for o in self.objects.values() if o.mentioned and not o.detected]

    @property
    def detected_not_mentioned(self) -> list[str]:
        return [o.name for o in self.objects.values() if o.detected and not o.mentioned]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "answer": self.answer_text,
            "template": self.template,
            "tokenization": self.tokenization,
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "mentioned_not_detected": self.mentioned_not_detected,
            "detected_not_mentioned": self.detected_not_mentioned,
            "objects": [
                {
                    "name": o.name,
                    "mentioned": o.mentioned,
                    "detected": o.detected,
                    "score": round(o.score, 6),
                    "box": [round(v, 2) for v in o.box],
                }
                for o in self.objects.values()
            ],
            "mentions": [m.__dict__ for m in self.mentions],
        }


def check_hallucinations(
    model: Any,
    image_or_t: Any,
    prompt: str,
    answer: Any = None,
    objects: Sequence[str] | None = None,
    extra_queries: Sequence[str] = (),
    threshold: float = 0.1,
    max_new_tokens: int = 64,
    template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
    ga: GradientAlignment | None = None,
    tokenization: str = INTERACTIVE_TOKENIZATION,
    preprocessing: str = INTERACTIVE_PREPROCESSING,
) -> HallucinationReport:
    """Build the hallucination view of J's answer to ``prompt``.

    Args:
        model: a ``JointModel``.
        image_or_t: image, ``JointEmbedding`` or ``t`` (as :meth:`GradientAlignment.attribute`).
        prompt: the question.
        answer: the answer (text or ``JointAnswer``); None generates one greedily.
        objects: the object vocabulary mentions are looked up in (default: COCO's 80 names).
        extra_queries: further objects to query; one the answer names (singular or plural) counts
            as mentioned, the others can only be detected-but-not-mentioned.
        threshold: detection score threshold.
        max_new_tokens: generation limit when ``answer`` is None.
        template: the conversation template of the prompt, ``"llava-1.5"`` (default, as chat)
            or ``"paper"`` (the authors' hallucination study); a ``JointAnswer`` brings its own.
        ga: a :class:`~jmllm.joint.GradientAlignment` to reuse (and keep, in its cache, the
            gradient norms of this image and query set); default a fresh one.
        tokenization: ``"checkpoint"`` (default, as chat) or ``"legacy"`` (the authors' ids).
        preprocessing: how an image is embedded, ``"exif"`` (default) or ``"authors"``.

    Returns:
        :class:`HallucinationReport`.

    Example:
        >>> rep = check_hallucinations(model, "bus.jpg", "What's on the back of the bus?",
        ...                            extra_queries=["advertisement"])  # doctest: +SKIP
        >>> rep.mentioned_not_detected  # doctest: +SKIP
        ['heart']
    """
    from jmllm.joint.saliency import _template_name, answer_tokens

    template_name = _template_name(answer, template)  # an unknown name fails here, first
    ga = ga or GradientAlignment(model)
    t, size, emb = ga.embedding(image_or_t, preprocessing)
    prompt_ids, answer_ids = ga.answer(
        emb, t, prompt, answer, max_new_tokens, template, tokenization
    )
    if hasattr(answer, "token_ids") and isinstance(getattr(answer, "tokenization", None), str):
        tokenization = answer.tokenization  # a JointAnswer brings its own
    text, _ = answer_tokens(model.tokenizer, answer_ids)
    extra_names = [" ".join(q.split()).lower() for q in extra_queries if q.strip()]
    # An extra query the answer itself names is a mention like any other (singular or plural),
    # never "detected but not mentioned".
    mentions = object_mentions(text, [*(objects or COCO_OBJECTS), *extra_names])
    mentioned = list(dict.fromkeys(m.name for m in mentions))
    extras = [q for q in extra_names if q not in mentioned]
    queries = mentioned + list(dict.fromkeys(extras))
    checks: dict[str, ObjectCheck] = {}
    if queries:
        prepared = ga.prepare(t, size, queries, _template())
        scores = prepared.class_scores  # (N, Q)
        forced = ForcedAnswer(prompt_ids, answer_ids)
        for q, name in enumerate(queries):
            best = int(scores[:, q].argmax())
            score = float(scores[best, q])
            checks[name] = ObjectCheck(
                name=name,
                mentioned=name in mentioned,
                score=score,
                box=[float(v) for v in prepared.boxes_xyxy[best]],
                detected=score >= threshold,
            )
        for m in mentions:
            check = checks[m.name]
            if check.ga is None:
                word = _first_word(m.text)
                check.ga = ga.attribute(
                    emb if emb is not None else t, prompt, word, queries, answer=forced
                )
                check.ga.meta["template"] = template_name
                check.ga.meta["tokenization"] = tokenization
                check.ga.meta["query_index"] = queries.index(m.name)
    return HallucinationReport(
        prompt=prompt,
        answer_text=text,
        mentions=mentions,
        objects=checks,
        threshold=threshold,
        image=emb.pil_image(0) if emb is not None and emb.images else None,
        image_size=size,
        template=template_name,
        tokenization=tokenization,
        preprocessing=getattr(emb, "preprocessing", None),
    )


def _template() -> str:
    from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE

    return DEFAULT_QUERY_TEMPLATE


def _first_word(phrase: str) -> str:
    # a two-word name ("teddy bear") is explained through its last, head word
    return re.findall(r"[^\W_]+", phrase)[-1]


@dataclass
class ForcedAnswer:
    """An already known answer (prompt and answer ids) to explain without regenerating: pass
    it as ``answer=`` to :meth:`GradientAlignment.attribute`."""

    prompt_ids: Any
    token_ids: Any


__all__ = [
    "COCO_OBJECTS",
    "ForcedAnswer",
    "HallucinationReport",
    "MentionedObject",
    "ObjectCheck",
    "check_hallucinations",
    "object_mentions",
]
