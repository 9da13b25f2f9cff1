"""Training the toy OWL-ViT for open-vocabulary detection of the scenes' objects.

The model is the stock ``OwlViTForObjectDetection``; its outputs are computed the way J computes
them (:func:`jmllm.align.owl_penultimate` → ``t`` → :func:`jmllm.joint.detection.owl_detection_heads`),
so what is trained is exactly what J and GA later read. Text and vision towers are trained from
scratch, together.

The loss is a set-prediction loss (DETR, Carion et al. 2020, as OWL-ViT was fine-tuned; Minderer
et al. 2022), with two additions that make a small detector learn fast and fit GA:

- Queries: every shape (``a photo of a circle``) and every colour–shape name (``a photo of a red
  circle``), 20 texts encoded by the text tower each step; class logits are OWL-ViT's (cosine of
  patch and query embeddings, learned shift and scale).
- Matching: each object is assigned one patch by ``scipy.optimize.linear_sum_assignment`` on the
  cost ``-class_weight · mean(p(shape query), p(name query)) + l1_weight · L1 + giou_weight ·
  (−GIoU)``; the matched patch's box gets L1 + (1 − GIoU).
- Dense positives: every patch an object covers (at least :data:`~jmllm.joint.toy.pool.COVERED`
  of its area) is also a positive for the object's shape and name queries and regresses its box
  (``inside_weight``), so every patch on an object points at it, as a trained OWL-ViT's do; the
  other patches regress their own grid cell (``background_weight``), so empty regions predict
  small local boxes. GA paints each patch's box, so both make its maps land on objects.
- IoU-aware classification (as VarifocalNet, Zhang et al. 2021): a positive's class target is the
  IoU of its own box with the object's (detached), so a patch that sees an object but boxes it
  badly scores low and never outranks a good box. Sigmoid focal loss over every (patch, query).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss

from jmllm.align import ImageNormalization, owl_penultimate
from jmllm.joint.detection.heads import cxcywh_to_xyxy, decode_detections, owl_detection_heads
from jmllm.joint.toy.models import CLIP_MEAN, CLIP_STD, OWL_TEXT_POSITIONS, QUERY_TEMPLATE
from jmllm.joint.toy.pool import COVERED, ScenePool
from jmllm.joint.toy.scenes import COLOURS, SHAPES, ToyObject
from jmllm.joint.toy.schedule import warmup_cosine

QUERY_NAMES: tuple[str, ...] = tuple(SHAPES) + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


@dataclass
class DetectorRecipe:
    """How the toy OWL-ViT is trained (the defaults are the shipped recipe's)."""

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3  # AdamW peak, linear warm-up then cosine decay to 0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    inside_weight: float = 2.0  # patches on an object regress its box
    background_weight: float = 0.1  # other patches regress their own cell
    grad_clip: float = 1.0
    focal: bool = True  # sigmoid focal loss (alpha 0.25, gamma 2); False: plain BCE
    iou_aware: bool = True  # positives' class targets are their boxes' IoU with the object

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_queries(owl: Any, tokenizer: Any, names: tuple[str, ...] = QUERY_NAMES) -> torch.Tensor:
    """Query embeddings (Q, D_q), L2-normalised, exactly as ``JointModel.encode_queries`` makes
    them (template ``a photo of a {}``, padded to OWL-ViT's 16 positions). Differentiable."""
    texts = [QUERY_TEMPLATE.format(n) for n in names]
    tokens = tokenizer(
        texts, padding="max_length", max_length=OWL_TEXT_POSITIONS, return_tensors="pt"
    )
    out = owl.owlvit.get_text_features(
        input_ids=tokens.input_ids.to(owl.device),
        attention_mask=tokens.attention_mask.to(owl.device),
    )
    embeds = out.pooler_output if hasattr(out, "pooler_output") else out
    return embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True)


def owl_norm(owl: Any) -> ImageNormalization:
    """The toy OWL-ViT's pixel normalisation (what its processor and J use)."""
    return ImageNormalization(int(owl.config.vision_config.image_size), CLIP_MEAN, CLIP_STD)


def _cell_boxes(grid: int) -> torch.Tensor:
    """(grid², 4) ``cx, cy, w, h`` of every patch's own cell, row-major like OWL-ViT's tokens."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    size = torch.full_like(cx, 1.0 / grid)
    return torch.stack([cx, cy, size, size], dim=-1).reshape(-1, 4)


@dataclass
class _Targets:
    boxes: torch.Tensor  # (K, 4) cx, cy, w, h in [0, 1]
    shape_ids: torch.Tensor  # (K,) query index of the object's shape
    name_ids: torch.Tensor  # (K,) query index of the object's colour-shape name


def targets_of(objects: tuple[ToyObject, ...], image_size: int) -> _Targets:
    """An image's objects as normalised ``cx, cy, w, h`` boxes and query indices."""
    xyxy = torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4) / image_size
    cxcywh = torch.stack(
        [
            (xyxy[:, 0] + xyxy[:, 2]) / 2,
            (xyxy[:, 1] + xyxy[:, 3]) / 2,
            xyxy[:, 2] - xyxy[:, 0],
            xyxy[:, 3] - xyxy[:, 1],
        ],
        dim=-1,
    )
    return _Targets(
        boxes=cxcywh,
        shape_ids=torch.tensor([QUERY_NAMES.index(o.shape) for o in objects]),
        name_ids=torch.tensor([QUERY_NAMES.index(o.name) for o in objects]),
    )


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter, area_a + area_b - inter


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding ``x0, y0, x1, y1`` boxes (..., 4) → (...)."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=1e-9)


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al. 2019) of corresponding boxes (..., 4) → (...)."""
    inter, union = _inter_union(a, b)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union.clamp(min=1e-9) - (hull - union) / hull.clamp(min=1e-9)


@dataclass
class _BatchTargets:
    """A batch's objects padded to K per image."""

    boxes: torch.Tensor  # (B, K, 4) cx, cy, w, h
    shape_ids: torch.Tensor  # (B, K)
    name_ids: torch.Tensor  # (B, K)
    valid: torch.Tensor  # (B, K) bool
    coverage: torch.Tensor  # (B, K, N) fraction of each patch covered by each object

    @classmethod
    def stack(cls, targets: list[_Targets], coverage: torch.Tensor) -> _BatchTargets:
        B, K = len(targets), coverage.shape[1]
        out = cls(
            boxes=torch.full((B, K, 4), 0.5),
            shape_ids=torch.zeros(B, K, dtype=torch.long),
            name_ids=torch.zeros(B, K, dtype=torch.long),
            valid=torch.zeros(B, K, dtype=torch.bool),
            coverage=coverage,
        )
        for b, t in enumerate(targets):
            k = t.boxes.shape[0]
            out.boxes[b, :k], out.shape_ids[b, :k], out.name_ids[b, :k] = (
                t.boxes,
                t.shape_ids,
                t.name_ids,
            )
            out.valid[b, :k] = True
        return out


def match(
    logits: torch.Tensor, boxes: torch.Tensor, targets: _BatchTargets, recipe: DetectorRecipe
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hungarian assignment of every image's objects to patches: per image (patches, objects).

    Args:
        logits: (B, N, Q) class logits; boxes: (B, N, 4) predicted ``cx, cy, w, h``.
    """
    with torch.no_grad():
        probs = torch.sigmoid(logits.float())  # (B, N, Q)
        index = lambda ids: ids.unsqueeze(1).expand(-1, probs.shape[1], -1)  # noqa: E731
        class_cost = (
            -(probs.gather(2, index(targets.shape_ids)) + probs.gather(2, index(targets.name_ids)))
            / 2
        )
        l1_cost = torch.cdist(boxes.float(), targets.boxes, p=1)  # (B, N, K)
        giou = paired_giou(
            cxcywh_to_xyxy(boxes.float()).unsqueeze(2), cxcywh_to_xyxy(targets.boxes).unsqueeze(1)
        )  # (B, N, K)
        cost = (
            recipe.class_weight * class_cost
            + recipe.l1_weight * l1_cost
            - recipe.giou_weight * giou
        )
    costs = cost.cpu().numpy()  # (B, N, K)
    valid = targets.valid.numpy()
    out = []
    for b in range(costs.shape[0]):
        cols_valid = np.nonzero(valid[b])[0]
        rows, cols = linear_sum_assignment(costs[b][:, cols_valid])
        out.append((rows, cols_valid[cols]))
    return out


def _box_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair L1 (summed over coordinates) + (1 − GIoU) of ``cx, cy, w, h`` boxes: (P,)."""
    l1 = (pred - target).abs().sum(-1)
    return l1 + 1.0 - paired_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))


def detection_loss(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    targets: list[_Targets],
    coverage: torch.Tensor,
    recipe: DetectorRecipe,
) -> dict[str, torch.Tensor]:
    """The set-prediction loss of a batch (see the module docstring).

    Args:
        logits: (B, N, Q) class logits for :data:`QUERY_NAMES`.
        boxes: (B, N, 4) predicted ``cx, cy, w, h`` in [0, 1].
        targets: one :class:`_Targets` per image.
        coverage: (B, K, N) fraction of each patch covered by each object's pixels.

    Returns:
        ``{"loss", "class", "l1", "giou", "inside", "background"}`` (scalars).
    """
    B, N, Q = logits.shape
    batch = _BatchTargets.stack(targets, coverage)
    matches = match(logits, boxes, batch, recipe)
    b_idx = torch.cat(
        [torch.full((len(r),), b, dtype=torch.long) for b, (r, _) in enumerate(matches)]
    )
    n_idx = torch.cat([torch.as_tensor(r, dtype=torch.long) for r, _ in matches])
    k_idx = torch.cat([torch.as_tensor(c, dtype=torch.long) for _, c in matches])
    num_objects = max(int(b_idx.numel()), 1)
    # patches showing an object: its pixels cover at least COVERED of the patch
    cells = _cell_boxes(math.isqrt(N)).to(boxes)  # (N, 4)
    best, owner = batch.coverage.max(1)  # (B, N): the object covering most of each patch
    inside = best >= COVERED
    on_object = inside.clone()
    ob, on = on_object.nonzero(as_tuple=True)
    # class targets: the matched patch and every patch on the object, for its shape and name;
    # IoU-aware (the target is the IoU of the patch's own box with the object's, detached), so a
    # patch that sees an object but boxes it badly scores low and never outranks a good box
    class_target = torch.zeros_like(logits)
    for bi, ni, ki in ((ob, on, owner[ob, on]), (b_idx, n_idx, k_idx)):
        quality: torch.Tensor | float = 1.0
        if recipe.iou_aware:
            with torch.no_grad():
                quality = paired_iou(
                    cxcywh_to_xyxy(boxes[bi, ni]), cxcywh_to_xyxy(batch.boxes[bi, ki])
                )
        class_target[bi, ni, batch.shape_ids[bi, ki]] = quality
        class_target[bi, ni, batch.name_ids[bi, ki]] = quality
    # summed over every (patch, query), per object (transformers' helper averages over queries)
    if recipe.focal:
        class_loss = (
            sigmoid_focal_loss(
                logits.reshape(B * N, Q), class_target.reshape(B * N, Q), num_objects
            )
            * Q
        )
    else:
        class_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, class_target, reduction="sum"
        ) / (num_objects * Q)
    pred, true = boxes[b_idx, n_idx], batch.boxes[b_idx, k_idx]
    l1_loss = (pred - true).abs().sum() / num_objects
    giou_loss = (1.0 - paired_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(true))).sum() / num_objects
    # boxes: patches on an object (other than the matched one) regress it; the rest their cell
    on_object[b_idx, n_idx] = False
    ob, on = on_object.nonzero(as_tuple=True)
    inside_loss = (
        _box_loss(boxes[ob, on], batch.boxes[ob, owner[ob, on]]).mean()
        if ob.numel()
        else boxes.sum() * 0
    )
    background = ~inside
    background[b_idx, n_idx] = False
    background_loss = (boxes - cells.unsqueeze(0)).abs().sum(-1)[background].mean()
    total = (
        recipe.class_weight * class_loss
        + recipe.l1_weight * l1_loss
        + recipe.giou_weight * giou_loss
        + recipe.inside_weight * inside_loss
        + recipe.background_weight * background_loss
    )
    return {
        "loss": total,
        "class": class_loss.detach(),
        "l1": l1_loss.detach(),
        "giou": giou_loss.detach(),
        "inside": inside_loss.detach(),
        "background": background_loss.detach(),
    }


def owl_outputs(
    owl: Any, pixel_values: torch.Tensor, query_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (B, N, Q) and boxes (B, N, 4) through ``t``, as J computes them."""
    t = owl_penultimate(owl, pixel_values)  # (B, 1 + N, D)
    return owl_detection_heads(owl, t, query_embeds)


def train_detector(
    owl: Any,
    tokenizer: Any,
    pool: ScenePool,
    recipe: DetectorRecipe,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``owl`` in place on ``pool``; returns the last losses and the step count.

    Batches are drawn with a seeded generator (the data order is the seed's), so the same seed
    and thread count give the same weights.
    """
    from tqdm.auto import tqdm

    owl.train()
    norm = owl_norm(owl)
    size = int(owl.config.vision_config.image_size)
    optimizer = torch.optim.AdamW(owl.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, recipe.warmup_steps, recipe.steps)
    )
    generator = torch.Generator().manual_seed(seed)
    targets_all = [targets_of(objs, size) for objs in pool.objects]
    coverage = pool.coverage(math.isqrt(owl.box_bias.shape[0]))  # (N_pool, K, N)
    bar = tqdm(range(recipe.steps), desc="toy OWL-ViT", disable=not progress, unit="step")
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for step in bar:
        idx = torch.randint(len(pool), (recipe.batch_size,), generator=generator)
        pixel_values = norm(pool.images(idx))
        queries = encode_queries(owl, tokenizer)
        logits, boxes = owl_outputs(owl, pixel_values, queries)
        losses = detection_loss(
            logits, boxes, [targets_all[int(i)] for i in idx], coverage[idx], recipe
        )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(owl.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == recipe.steps - 1:
            last = {k: float(v.detach()) for k, v in losses.items()}
            first = first or last
            bar.set_postfix(loss=f"{last['loss']:.3f}", cls=f"{last['class']:.3f}")
    owl.eval()
    return {"steps": recipe.steps, "first_losses": first, "final_losses": last}


@torch.no_grad()
def shape_detections(
    owl: Any, tokenizer: Any, pool: ScenePool, nms_iou: float | None = None, batch_size: int = 64
) -> list[Any]:
    """OWL-ViT's detections of the four shape queries on every pool image (no score threshold):
    one :class:`~jmllm.joint.detection.Detections` per image, as ``JointModel.detect`` decodes
    them (each patch votes for its best query)."""
    owl.eval()
    norm = owl_norm(owl)
    queries = encode_queries(owl, tokenizer, tuple(SHAPES))
    size = int(owl.config.vision_config.image_size)
    out = []
    for start in range(0, len(pool), batch_size):
        idx = list(range(start, min(start + batch_size, len(pool))))
        logits, boxes = owl_outputs(owl, norm(pool.images(idx)), queries)
        for b in range(len(idx)):
            out.append(
                decode_detections(logits[b], boxes[b], (size, size), list(SHAPES), 0.0, nms_iou)
            )
    return out


def shape_ap50(detections: list[Any], pool: ScenePool, iou: float = 0.5) -> dict[str, float]:
    """AP at IoU ``iou`` of every shape query over the pool's scenes."""
    from jmllm.joint.toy.metrics import average_precision

    result = {}
    for q, shape in enumerate(SHAPES):
        predictions, truths = [], []
        for dets, objects in zip(detections, pool.objects, strict=True):
            keep = dets.labels == q
            predictions.append((dets.boxes[keep].numpy(), dets.scores[keep].numpy()))
            truths.append(
                np.array([o.box for o in objects if o.shape == shape], dtype=np.float64).reshape(
                    -1, 4
                )
            )
        result[shape] = average_precision(predictions, truths, iou)
    return result
