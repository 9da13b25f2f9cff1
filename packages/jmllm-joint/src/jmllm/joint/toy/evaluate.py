"""Held-out scores of a toy J: detection AP50 per shape, caption and QA accuracy, stock and J.

Everything goes through the public paths: detections through ``JointModel.detection_heads`` on
``t``, decoded as ``detect`` decodes them (``detection_ap50``: with ``jmllm-joint detect``'s
default threshold and NMS; ``detection_ap50_no_nms``: every patch's box), answers through
``JointModel.generate`` with greedy decoding, ``vision="joint"`` (W(t)) or ``vision="llava"``
(the toy LLaVA's own vision tower).

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> from jmllm.joint.toy.evaluate import evaluate_joint
    >>> scores = evaluate_joint(load_toy_joint(), scenes=50)  # doctest: +SKIP
    >>> scores["caption_accuracy"]["joint"]["llava-1.5"]  # doctest: +SKIP
    0.8
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from jmllm.joint.chat.templates import LLAVA_TEMPLATES
from jmllm.joint.detection.heads import DEFAULT_NMS_IOU, DEFAULT_THRESHOLD, decode_detections
from jmllm.joint.toy.metrics import average_precision, caption_accuracy
from jmllm.joint.toy.pool import ScenePool
from jmllm.joint.toy.scenes import (
    CONTENT_QUESTION,
    IN_IMAGE_QUESTION,
    SHAPES,
    normalise_answer,
)

VISIONS = ("llava", "joint")  # stock toy LLaVA, then J
CAPTION_KINDS = ("content", "in_image")


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


@torch.no_grad()
def detection_ap50(
    model: Any,
    pool: ScenePool,
    nms_iou: float | None = DEFAULT_NMS_IOU,
    batch_size: int = 64,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """AP at IoU 0.5 of every shape query (``a photo of a <shape>``) on the pool's scenes.

    The detections are decoded as ``JointModel.detect`` decodes them (every patch votes for its
    best shape query), by default with ``jmllm-joint detect``'s defaults: score ``threshold``
    0.1 and per-class NMS at IoU 0.3, so the figure is the AP of the boxes a user of ``detect``
    gets. ``nms_iou=None, threshold=0`` scores every patch's box instead: the toy OWL-ViT, like
    OWL-ViT, gives several patches of one object a high score, and every duplicate is a false
    positive, so that AP is much lower.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        pool: held-out scenes with their truth.
        nms_iou: per-class NMS IoU; None: no NMS.
        batch_size: images embedded at once.
        threshold: minimum score of a detection.

    Returns:
        ``{shape: AP50}`` for every shape of the scenes.

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> pool = ScenePool.render("heldout", 20, seed=0, start=5000)
        >>> ap = detection_ap50(load_toy_joint(), pool)
        >>> sorted(ap) == sorted(SHAPES) and min(ap.values()) > 0.5
        True
    """
    names = list(SHAPES)
    queries = model.encode_queries(names)
    predictions: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    truths: dict[str, list[np.ndarray]] = defaultdict(list)
    for idx in _batches(len(pool), batch_size):
        emb = model.embed(pool.images(idx))
        logits, boxes = model.detection_heads(emb.t, queries)
        for b, i in enumerate(idx):
            dets = decode_detections(
                logits[b], boxes[b], emb.image_sizes[b], names, threshold, nms_iou
            )
            for q, shape in enumerate(names):
                keep = dets.labels == q
                predictions[shape].append((dets.boxes[keep].numpy(), dets.scores[keep].numpy()))
                gt = [o.box for o in pool.objects[i] if o.shape == shape]
                truths[shape].append(np.array(gt, dtype=np.float64).reshape(-1, 4))
    return {s: average_precision(predictions[s], truths[s], 0.5) for s in names}


def detection_scores(model: Any, pool: ScenePool) -> dict[str, Any]:
    """Both detection figures of the manifest and the decoding behind each.

    Returns:
        ``{"detection_ap50": {shape: AP50}`` with ``jmllm-joint detect``'s defaults (score ≥
        0.1, per-class NMS at IoU 0.3), ``"detection_ap50_no_nms": {shape: AP50}`` of every
        patch's box (no threshold, no NMS), ``"detection_decoding": {key: settings}}``.
    """
    return {
        "detection_ap50": detection_ap50(model, pool),
        "detection_ap50_no_nms": detection_ap50(model, pool, nms_iou=None, threshold=0.0),
        "detection_decoding": {
            "detection_ap50": {"threshold": DEFAULT_THRESHOLD, "nms_iou": DEFAULT_NMS_IOU},
            "detection_ap50_no_nms": {"threshold": 0.0, "nms_iou": None},
        },
    }


@torch.no_grad()
def answer_scores(
    model: Any,
    pool: ScenePool,
    visions: tuple[str, ...] = VISIONS,
    templates: tuple[str, ...] = LLAVA_TEMPLATES,
    batch_size: int = 64,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Caption and QA accuracy of each vision path in each template on the pool's scenes.

    Returns:
        ``{"caption_accuracy": {vision: {template: acc}}, "in_image_accuracy": …,
        "qa_accuracy": {vision: {template: acc}}, "qa_by_kind": {vision: {kind: acc}},
        "questions": n, "examples": [...]}``. Captions are ``What's the content of the
        image?`` answers scored by :func:`~jmllm.joint.toy.metrics.caption_accuracy`;
        ``in_image`` is the same for ``What's in the image?``; QA are every other question
        of the scenes (exact match after normalisation).
    """
    emb_all = [model.embed(pool.images(idx)) for idx in _batches(len(pool), batch_size)]
    out: dict[str, Any] = defaultdict(dict)
    examples: list[dict[str, str]] = []
    qa = [
        (i, q)
        for i, questions in enumerate(pool.questions)
        for q in questions
        if q.kind not in CAPTION_KINDS
    ]
    for vision in visions:
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for template in templates:
            for key, question in (("caption", CONTENT_QUESTION), ("in_image", IN_IMAGE_QUESTION)):
                texts: list[str] = []
                for emb in emb_all:
                    answers = model.generate(
                        emb,
                        question,
                        max_new_tokens=max_new_tokens,
                        vision=vision,
                        template=template,
                    )
                    texts.extend(a.text for a in answers)
                out[f"{key}_accuracy"].setdefault(vision, {})[template] = caption_accuracy(
                    texts, pool.objects
                )
                if key == "caption" and template == templates[0]:
                    examples.extend(
                        {"vision": vision, "truth": pool.captions[i], "answer": texts[i]}
                        for i in range(min(3, len(texts)))
                    )
            correct = []
            for chunk in _batches(len(qa), batch_size):
                items = [qa[c] for c in chunk]
                emb = _select(emb_all, [i for i, _ in items], batch_size)
                answers = model.generate(
                    emb,
                    [q.question for _, q in items],
                    max_new_tokens=4,
                    vision=vision,
                    template=template,
                )
                for (_, q), a in zip(items, answers, strict=True):
                    ok = normalise_answer(a.text) == normalise_answer(q.answer)
                    correct.append(ok)
                    by_kind[q.kind].append(ok)
            out["qa_accuracy"].setdefault(vision, {})[template] = float(np.mean(correct))
        out["qa_by_kind"][vision] = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
    out["questions"] = len(qa)
    out["scenes"] = len(pool)
    out["examples"] = examples
    return dict(out)


def _select(chunks: list[Any], indices: list[int], batch_size: int) -> Any:
    """The sub-batch of scene ``indices`` from embeddings computed in batches of ``batch_size``."""
    from jmllm.joint.model.joint import JointEmbedding

    parts = [chunks[i // batch_size].select(i % batch_size) for i in indices]
    return JointEmbedding(
        t=torch.cat([p.t for p in parts]),
        image_sizes=[s for p in parts for s in p.image_sizes],
        images=[im for p in parts for im in p.images],
    )


def evaluate_joint(
    model: Any,
    scenes: int = 200,
    seed: int = 0,
    start: int = 0,
    progress: bool = False,
    templates: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """All held-out scores of a toy J on ``scenes`` held-out scenes of world ``seed``
    (``templates``: the conversation templates scored; None: :func:`answer_scores`' default).

    Returns:
        ``{"detection_ap50": {shape: AP}, "detection_ap50_no_nms": {...}, "detection_decoding",
        "caption_accuracy", "in_image_accuracy", "qa_accuracy", "qa_by_kind", ...}`` (see
        :func:`detection_scores` and :func:`answer_scores`).
    """
    pool = ScenePool.render("heldout", scenes, seed=seed, start=start, progress=progress)
    result = detection_scores(model, pool)
    result.update(answer_scores(model, pool, templates=templates or LLAVA_TEMPLATES))
    return result
