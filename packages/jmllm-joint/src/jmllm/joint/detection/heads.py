"""O^OWL: OWL-ViT's (or OWLv2's) detections computed from the shared embedding ``t`` (DESIGN §1.2).

``t`` is OWL-ViT's penultimate vision hidden state, (B, 1 + N, D) with the CLS token first. The
detection heads finish the encoder exactly as ``OwlViTForObjectDetection.image_text_embedder``,
``class_predictor`` and ``box_predictor`` do, through the modules' own forward methods:

    last encoder layer → post-layernorm → patch × CLS merge → layer norm → class head, box head

so that, on the same pixels, the logits and boxes equal the stock model's outputs. Decoding turns
the N per-patch predictions into pixel boxes in the *original* image size (the image was squashed
to a square, so x and y are scaled separately), with a score threshold and optional per-class NMS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from jmllm.align.features import owl_base_model

DEFAULT_THRESHOLD = 0.1
"""``jmllm-joint detect``'s default minimum score (``--threshold``)."""

DEFAULT_NMS_IOU = 0.3
"""``jmllm-joint detect``'s default per-class NMS IoU (``--nms``); the explorer and the toy world's
``detection_ap50`` decode with it too, so their boxes and scores are the command line's."""


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes: (K, 4) float boxes ``x0, y0, x1, y1`` in pixels of the original image.
        scores: (K,) sigmoid scores.
        labels: (K,) indices into ``queries``.
        queries: the query names the labels index (e.g. ``["cat", "dog"]``).
        patches: (K,) index of the OWL-ViT patch that predicted each box.
        image_size: (width, height) of the original image.
        objectness: (K,) OWLv2's objectness scores (sigmoid of its objectness logits) of the
            kept boxes; None for OWL-ViT, which has no objectness head.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    queries: list[str]
    patches: torch.Tensor
    image_size: tuple[int, int]
    threshold: float = 0.1
    meta: dict[str, Any] = field(default_factory=dict)
    objectness: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def names(self) -> list[str]:
        """The query name of every detection."""
        return [self.queries[int(i)] for i in self.labels]

    def to_records(self) -> list[dict[str, Any]]:
        """Plain JSON-ready records, highest score first (with ``objectness`` for OWLv2)."""
        records = [
            {
                "label": self.queries[int(label)],
                "score": round(float(score), 6),
                "box": [round(float(v), 2) for v in box],
                "patch": int(patch),
            }
            for box, score, label, patch in zip(
                self.boxes, self.scores, self.labels, self.patches, strict=True
            )
        ]
        if self.objectness is not None:
            for record, value in zip(records, self.objectness, strict=True):
                record["objectness"] = round(float(value), 6)
        return records


class HeadOutputs(NamedTuple):
    """O^OWL on ``t``: class logits (B, N, Q), boxes (B, N, 4) ``cx, cy, w, h`` in [0, 1] of the
    model's square input, and OWLv2's objectness logits (B, N) (None for OWL-ViT)."""

    class_logits: torch.Tensor
    boxes: torch.Tensor
    objectness: torch.Tensor | None


def pads_to_square(owl: Any) -> bool:
    """Whether an OWL detector's input is the image padded to a square (OWLv2) rather than
    squashed (OWL-ViT): its boxes are then fractions of the padded square.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> pads_to_square(NS(config=NS(model_type="owlv2")))
        True
    """
    return getattr(owl.config, "model_type", "owlvit") == "owlv2"


def image_fraction_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """OWLv2's boxes (…, 4) ``cx, cy, w, h`` in fractions of the image padded to a square
    (bottom and right) as fractions of the image itself, so they scale like OWL-ViT's squashed
    boxes: x by the width, y by the height.

    Example:
        >>> image_fraction_boxes(torch.tensor([[0.25, 0.25, 0.5, 0.5]]), (200, 100)).tolist()
        [[0.25, 0.5, 0.5, 1.0]]
    """
    width, height = image_size
    side = max(width, height)
    scale = torch.tensor([side / width, side / height] * 2, dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def owl_detection_heads(
    owl: Any, t: torch.Tensor, query_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OWL-ViT's class logits and boxes from ``t``, a differentiable pure function.

    Args:
        owl: an ``OwlViTForObjectDetection`` (or ``Owlv2ForObjectDetection``).
        t: (B, 1 + N, D) penultimate hidden state, CLS first.
        query_embeds: (Q, D_q) text-query embeddings (projected and L2-normalised, as
            ``OwlViTModel.forward`` gives them), or (B, Q, D_q) per image.

    Returns:
        class_logits (B, N, Q) float32 and boxes (B, N, 4) ``cx, cy, w, h`` in [0, 1].
    """
    out = owl_head_outputs(owl, t, query_embeds, objectness=False)
    return out.class_logits, out.boxes


def owl_head_outputs(
    owl: Any, t: torch.Tensor, query_embeds: torch.Tensor, objectness: bool = True
) -> HeadOutputs:
    """Every head of an OWL detector on ``t``: class logits, boxes and (OWLv2) objectness.

    OWLv2's objectness head reads the same merged patch features as the box head; the stock
    ``objectness_predictor`` detaches them, this calls the head module itself so its logits
    (equal in value) stay differentiable in ``t`` (GA's ``objectness`` channel).

    Args:
        owl: an ``OwlViTForObjectDetection`` or ``Owlv2ForObjectDetection``.
        t: (B, 1 + N, D) penultimate hidden state, CLS first.
        query_embeds: (Q, D_q) or (B, Q, D_q) text-query embeddings.
        objectness: compute OWLv2's objectness logits (ignored for OWL-ViT).

    Returns:
        :class:`HeadOutputs`.

    Example:
        >>> out = owl_head_outputs(owl, t, queries)  # doctest: +SKIP
        >>> out.objectness.shape  # OWLv2 base: (B, 3600)  # doctest: +SKIP
    """
    vision = owl_base_model(owl).vision_model
    B, S, D = t.shape
    hidden = vision.encoder.layers[-1](t, attention_mask=None)  # (B, 1 + N, D)
    image_embeds = vision.post_layernorm(hidden)
    cls = torch.broadcast_to(image_embeds[:, :1, :], image_embeds[:, :-1].shape)  # (B, N, D)
    feats = owl.layer_norm(image_embeds[:, 1:, :] * cls)  # (B, N, D)
    N = S - 1
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"t has {N} patch tokens, not a square grid")
    queries = (
        query_embeds if query_embeds.dim() == 3 else query_embeds.unsqueeze(0).expand(B, -1, -1)
    )
    queries = queries.to(device=feats.device, dtype=feats.dtype)  # (B, Q, D_q)
    # An all-true query mask: every query is real (the stock model masks padded query slots), and
    # with a mask the class head returns float32 logits, as the stock forward does.
    query_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=feats.device)
    class_logits, _ = owl.class_predictor(feats, queries, query_mask)  # (B, N, Q)
    feature_map = feats.reshape(B, side, side, D)  # (B, h, w, D)
    boxes = owl.box_predictor(feats, feature_map)  # (B, N, 4)
    objectness_logits = None
    if objectness and hasattr(owl, "objectness_head"):
        objectness_logits = owl.objectness_head(feats)[..., 0]  # (B, N), not detached
    return HeadOutputs(class_logits, boxes, objectness_logits)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) centre/size boxes to corner boxes."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (K, 4) and (M, 4) ``x0, y0, x1, y1`` boxes: (K, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])  # (K, M, 2)
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # (K, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    Example:
        >>> b = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.]])
        >>> nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
        [0, 2]
    """
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    iou = box_iou(boxes[order], boxes[order])  # (K, K) in score order
    keep = torch.ones(order.numel(), dtype=torch.bool)
    for i in range(order.numel()):
        if keep[i]:
            suppressed = iou[i, i + 1 :] > iou_threshold
            keep[i + 1 :] &= ~suppressed.cpu()
    return order[keep.to(order.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Per-class NMS: boxes of different labels never suppress each other."""
    keep = [
        torch.nonzero(labels == label).flatten()[
            nms(boxes[labels == label], scores[labels == label], iou_threshold)
        ]
        for label in labels.unique()
    ]
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    kept = torch.cat(keep)
    return kept[scores[kept].argsort(descending=True)]


def decode_detections(
    class_logits: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    queries: list[str],
    threshold: float = 0.1,
    nms_iou: float | None = None,
    objectness: torch.Tensor | None = None,
    pads_to_square: bool = False,
) -> Detections:
    """Pixel detections of one image from its per-patch logits and boxes.

    Every patch votes for its best query (as OWL-ViT's post-processing does); a detection is kept
    when its sigmoid score reaches ``threshold``. Boxes are scaled to the original size, x by the
    width and y by the height (OWLv2, ``pads_to_square``: both by the longer side, as its
    processor padded the image bottom and right), and clipped to the image.

    Args:
        class_logits: (N, Q) logits of one image.
        boxes: (N, 4) ``cx, cy, w, h`` in [0, 1] of the squashed square.
        image_size: original (width, height).
        queries: the Q query names.
        threshold: minimum score.
        nms_iou: IoU above which a lower-scored box of the same label is dropped; None: no NMS.
        objectness: (N,) OWLv2's objectness logits; their sigmoids are kept per detection.
        pads_to_square: the boxes are fractions of the image padded to a square (OWLv2).

    Returns:
        :class:`Detections`, highest score first.
    """
    with torch.no_grad():
        probs = torch.sigmoid(class_logits.float())  # (N, Q)
        scores, labels = probs.max(dim=-1)  # (N,)
        width, height = image_size
        sx, sy = (max(width, height),) * 2 if pads_to_square else (width, height)
        scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        xyxy = cxcywh_to_xyxy(boxes.float().cpu()) * scale  # (N, 4) pixels
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        scores, labels = scores.cpu(), labels.cpu()
        keep = torch.nonzero(scores >= threshold).flatten()
        if nms_iou is not None:
            keep = keep[batched_nms(xyxy[keep], scores[keep], labels[keep], nms_iou)]
        else:
            keep = keep[scores[keep].argsort(descending=True)]
        return Detections(
            boxes=xyxy[keep],
            scores=scores[keep],
            labels=labels[keep],
            queries=list(queries),
            patches=keep,
            image_size=(int(width), int(height)),
            threshold=threshold,
            objectness=(
                torch.sigmoid(objectness.float().cpu())[keep] if objectness is not None else None
            ),
        )
