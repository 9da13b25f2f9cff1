"""W against LLaVA's own image tokens: the per-token error (the loss) and held-out evaluation.

The loss is the mean squared error over tokens, every token an independent sample (supplementary
§1); evaluation adds the mean token cosine similarity, summed over ranks under ``torchrun``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jmllm.align.architectures import AlignmentLayer
from jmllm.align.features import FeatureExtractor, owl_penultimate
from jmllm.align.train.distributed import _all_sum, _Dist
from jmllm.align.train.sources import Pixels


@dataclass
class EvalResult:
    """Held-out metrics: token-wise MSE and mean token cosine similarity."""

    mse: float
    cosine: float
    images: int
    skipped: int = 0


def _model_inputs(fx: FeatureExtractor, chunk: list[Pixels]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (B, 3, S, S) inputs of both encoders on fx's device, for decoded images."""
    if isinstance(chunk[0], tuple):  # normalised in the workers
        owl = torch.stack([c[0] for c in chunk])  # type: ignore[index]
        mllm = torch.stack([c[1] for c in chunk])  # type: ignore[index]
        return owl.to(fx.device), mllm.to(fx.device)
    images: list[torch.Tensor] = chunk  # type: ignore[assignment]
    owl = fx.owl_norm(images, fx.device, fx.preprocessing)
    return owl, fx.mllm_norm(images, fx.device, fx.preprocessing)


def _micro_batches(images: list[Pixels], size: int | None) -> list[list[Pixels]]:
    size = size or max(len(images), 1)
    return [images[i : i + size] for i in range(0, len(images), size)]


def _token_errors(
    model: torch.nn.Module, fx: FeatureExtractor, images: list[Pixels], drop_cls: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W against the MLLM's own tokens: per-token squared error (B, N), prediction and target."""
    with torch.no_grad():
        owl_pixels, mllm_pixels = _model_inputs(fx, images)  # (B, 3, S, S) each
        t = owl_penultimate(fx.owl, owl_pixels)  # (B, 1 + N_owl, D_owl), frozen teacher side
        source = fx.w_inputs(t, drop_cls)  # (B, N, D_owl): on the MLLM's grids
        target = fx.target_from_pixels(mllm_pixels).float()  # (B, N, D_llm)
    prediction = model(source).float()  # (B, N, D_llm)
    return (prediction - target).pow(2).mean(dim=-1), prediction, target  # (B, N) per-token MSE


@torch.no_grad()
def evaluate(
    layer: AlignmentLayer,
    fx: FeatureExtractor,
    images: list[Pixels],
    *,
    micro_batch_size: int = 16,
    autocast: bool = False,
    skipped: int = 0,
    info: _Dist | None = None,
) -> EvalResult:
    """Held-out token-wise MSE and mean token cosine similarity of W on decoded images.

    Under ``torchrun`` every rank passes its share; the sums are reduced over ranks.

    Example:
        >>> evaluate(layer, fx, [image_to_tensor(load_image("a.jpg"))])  # doctest: +SKIP
        EvalResult(mse=0.41, cosine=0.62, images=1, skipped=0)
    """
    info = info or _Dist()
    was_training = layer.training
    layer.eval()
    sse = cos = tokens = 0.0
    device = fx.device
    for chunk in _micro_batches(images, micro_batch_size):
        if not chunk:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            errors, prediction, target = _token_errors(layer, fx, chunk, layer.config.drop_cls)
        sse += errors.sum().item()
        cos += torch.nn.functional.cosine_similarity(prediction, target, dim=-1).sum().item()
        tokens += target.shape[0] * target.shape[1]
    layer.train(was_training)
    sse, cos, tokens, n, bad = _all_sum(
        [sse, cos, tokens, float(len(images)), float(skipped)], info, device
    )
    if tokens == 0:
        return EvalResult(mse=math.nan, cosine=math.nan, images=0, skipped=int(bad))
    return EvalResult(mse=sse / tokens, cosine=cos / tokens, images=int(n), skipped=int(bad))


def _global_loss(
    step_sse: torch.Tensor, tokens: float, previous: float | None, info: _Dist, device: torch.device
) -> float | None:
    """The mean squared error of one step over every rank's tokens (None before any token)."""
    (total,) = _all_sum([float(step_sse.item())], info, device)
    return total / tokens if tokens > 0 else previous
