"""Held-out scores of a toy J: detection AP50 per shape, caption and QA accuracy, stock and J.

Everything goes through the public paths: detections through ``JointModel.detection_heads`` on
``t`` (what ``detect`` decodes), answers through ``JointModel.generate`` with greedy decoding,
``vision="joint"`` (W(t)) or ``vision="llava"`` (the toy LLaVA's own vision tower).

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> from jmllm.joint.toy.evaluate import evaluate_joint
    >>> scores = evaluate_joint(load_toy_joint(), scenes=50)  # doctest: +SKIP
    >>> scores["caption_accuracy"]["joint"]["llava-1.5"]  # doctest: +SKIP
    0.98
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from jmllm.joint.chat import CONVERSATION_TEMPLATES
from jmllm.joint.detection import decode_detections
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
    model: Any, pool: ScenePool, nms_iou: float | None = None, batch_size: int = 64
) -> dict[str, float]:
    """AP at IoU 0.5 of every shape query (``a photo of a <shape>``) on the pool's scenes.

    Every patch votes for its best shape query (``JointModel.detect``'s decoding), no score
    threshold, optional per-class NMS.
    """
    names = list(SHAPES)
    queries = model.encode_queries(names)
    predictions: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    truths: dict[str, list[np.ndarray]] = defaultdict(list)
    for idx in _batches(len(pool), batch_size):
        emb = model.embed(pool.images(idx))
        logits, boxes = model.detection_heads(emb.t, queries)
        for b, i in enumerate(idx):
            dets = decode_detections(logits[b], boxes[b], emb.image_sizes[b], names, 0.0, nms_iou)
            for q, shape in enumerate(names):
                keep = dets.labels == q
                predictions[shape].append((dets.boxes[keep].numpy(), dets.scores[keep].numpy()))
                gt = [o.box for o in pool.objects[i] if o.shape == shape]
                truths[shape].append(np.array(gt, dtype=np.float64).reshape(-1, 4))
    return {s: average_precision(predictions[s], truths[s], 0.5) for s in names}


@torch.no_grad()
def answer_scores(
    model: Any,
    pool: ScenePool,
    visions: tuple[str, ...] = VISIONS,
    templates: tuple[str, ...] = tuple(CONVERSATION_TEMPLATES),
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
                    ok = normalise_answer(a.text) == q.answer
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
    from jmllm.joint.model import JointEmbedding

    parts = [chunks[i // batch_size].select(i % batch_size) for i in indices]
    return JointEmbedding(
        t=torch.cat([p.t for p in parts]),
        image_sizes=[s for p in parts for s in p.image_sizes],
        images=[im for p in parts for im in p.images],
    )


def evaluate_joint(
    model: Any, scenes: int = 200, seed: int = 0, start: int = 0, progress: bool = False
) -> dict[str, Any]:
    """All held-out scores of a toy J on ``scenes`` held-out scenes of world ``seed``.

    Returns:
        ``{"detection_ap50": {shape: AP}, "detection_ap50_nms": {...}, "caption_accuracy",
        "in_image_accuracy", "qa_accuracy", "qa_by_kind", ...}`` (see :func:`answer_scores`).
    """
    pool = ScenePool.render("heldout", scenes, seed=seed, start=start, progress=progress)
    result: dict[str, Any] = {
        "detection_ap50": detection_ap50(model, pool),
        "detection_ap50_nms": detection_ap50(model, pool, nms_iou=0.5),
    }
    result.update(answer_scores(model, pool))
    return result
