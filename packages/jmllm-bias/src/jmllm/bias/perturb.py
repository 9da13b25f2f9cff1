"""Semantic adversarial perturbation of the joint embedding ``t`` (paper §4.4, DESIGN §1.5).

J decodes OWL-ViT detections and LLaVA's answer from the same embedding ``t``. Moving ``t`` so that
OWL-ViT sees ``a photo of a {adversarial}`` instead of ``a photo of a {original}`` (e.g. a woman
instead of a man) and asking LLaVA the same question again shows how much the answer depends on
that concept.

Objective (minimised). With ``l_o[k]`` and ``l_a[k]`` the raw OWL-ViT class logits of patch ``k``
for the original and the adversarial query::

    L(t) = mean_k ( l_o[k] - l_a[k] )              reduction="mean" (default)
    L(t) = max_k l_o[k] - max_k l_a[k]             reduction="max"

The mean over all patches is the default because it is what the authors' code does in effect: it
takes the sign of the gradient of an MSE between *all* patches' logits and targets of -1e6
(original) and +1e6 (adversarial), and that gradient is, up to a positive factor, the gradient of
the mean above (the logits are negligible next to 1e6). It also moves every patch, whereas the max
gives a gradient through one patch only. The recorded OWL score of a query is the detector's
confidence, ``max_k sigmoid(logit[k])``; its max raw logit is recorded too, since the
sigmoid saturates.

What is guaranteed is that the *margin* ``l_a - l_o`` grows (for a small enough step). The two
logits need not move in opposite directions: OWL-ViT's class head adds a per-patch shift and
multiplies by a per-patch scale that are shared by all queries, so a step can raise or lower both
together while still separating them; the report shows each query's score so this is visible.

FGSM (the paper, ε = 1): ``t' = t - ε · sign(∇L(t))``. PGD: ``K`` steps of size ``α``,
``t_{j+1} = clip(t_j - α · sign(∇L(t_j)), t - ε, t + ε)`` (L∞ ball of radius ε around ``t``, no
random start, so results are deterministic). With ``K = 1`` and ``α = ε`` PGD is exactly FGSM;
the default step size for ``K > 1`` is ``2.5 ε / K`` (Madry et al.). ε = 0 returns ``t`` unchanged.
The whole ``t`` (CLS token included) is perturbed, as in the authors' code: OWL-ViT's heads use the
CLS token, and J drops it only on the LLaVA side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import BiasInputError

__all__ = ["PerturbationConfig", "PerturbationResult", "objective", "owl_scores", "perturb"]

_REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class PerturbationConfig:
    """FGSM / PGD settings.

    Example:
        >>> PerturbationConfig(eps=1.0).alpha  # one step of size ε: FGSM
        1.0
        >>> PerturbationConfig(eps=1.0, steps=10).alpha
        0.25
    """

    eps: float = 1.0  # L∞ budget around t (paper: 1, one FGSM step)
    steps: int = 1  # 1: FGSM; more: PGD with projection onto the ε-ball
    step_size: float | None = None  # None: ε for one step, 2.5 ε / steps for PGD
    reduction: str = "mean"  # how the objective pools the patches: "mean" or "max"

    def __post_init__(self) -> None:
        if not isinstance(self.eps, (int, float)) or not self.eps >= 0 or self.eps == float("inf"):
            raise BiasInputError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise BiasInputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.step_size is not None and (
            not isinstance(self.step_size, (int, float)) or not 0 < self.step_size < float("inf")
        ):
            raise BiasInputError(f"step size must be a finite number > 0, got {self.step_size!r}")
        if self.reduction not in _REDUCTIONS:
            raise BiasInputError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")

    @property
    def alpha(self) -> float:
        """The step size actually used."""
        if self.step_size is not None:
            return float(self.step_size)
        return float(self.eps) if self.steps == 1 else 2.5 * float(self.eps) / self.steps


@dataclass(frozen=True)
class PerturbationResult:
    """A perturbed embedding and what it did to OWL-ViT.

    ``scores_*`` are ``(B, 2)``: column 0 the original query, column 1 the adversarial one.
    """

    t: torch.Tensor  # (B, 1+N, D) perturbed embedding, same dtype/device as the input
    scores_before: torch.Tensor  # (B, 2) max over patches of sigmoid(class logit)
    scores_after: torch.Tensor  # (B, 2)
    logits_before: torch.Tensor  # (B, 2) max over patches of the raw class logit
    logits_after: torch.Tensor  # (B, 2)
    objective_before: torch.Tensor  # (B,) L(t)
    objective_after: torch.Tensor  # (B,) L(t')
    linf: torch.Tensor  # (B,) max |t' - t|


def objective(class_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``L`` per image from class logits ``(B, N, 2)`` (original query first); lower is better.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # (B=1, N=2, Q=2)
        >>> objective(logits).tolist(), objective(logits, "max").tolist()
        ([0.5], [1.0])
    """
    if class_logits.ndim != 3 or class_logits.shape[-1] != 2:
        raise ValueError(
            f"expected class logits of shape (B, N, 2), got {tuple(class_logits.shape)}"
        )
    l_orig, l_adv = class_logits[..., 0], class_logits[..., 1]  # (B, N) each
    if reduction == "mean":
        return (l_orig - l_adv).mean(dim=1)
    return l_orig.amax(dim=1) - l_adv.amax(dim=1)


def owl_scores(class_logits: torch.Tensor) -> torch.Tensor:
    """Detector confidence per query: ``max_k sigmoid(logit[k])``, ``(B, N, Q) -> (B, Q)``.

    Example:
        >>> owl_scores(torch.zeros(1, 3, 2)).tolist()
        [[0.5, 0.5]]
    """
    return torch.sigmoid(class_logits.float()).amax(dim=1)


def _logits(model: Any, t: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
    class_logits, _ = model.detection_heads(t, query_embeds)  # (B, N, Q), (B, N, 4)
    return class_logits


def perturb(
    model: Any,
    t: torch.Tensor,
    query_embeds: torch.Tensor,
    config: PerturbationConfig | None = None,
) -> PerturbationResult:
    """Perturb ``t`` towards the adversarial query and away from the original one.

    Args:
        model: a :class:`jmllm.joint.JointModel` (anything with ``detection_heads(t, queries)``).
        t: ``(B, 1+N, D)`` OWL-ViT penultimate embedding, CLS first (``JointEmbedding.t``).
        query_embeds: ``(2, D_q)`` query embeddings, original first then adversarial
            (``model.encode_queries([original, adversarial])``).
        config: ε, steps, step size, reduction; default one FGSM step with ε = 1.

    Returns:
        The perturbed embedding with OWL scores and objective before and after.

    Example:
        >>> q = model.encode_queries(["man", "woman"], template="a photo of a {}")  # doctest: +SKIP
        >>> res = perturb(model, emb.t, q, PerturbationConfig(eps=1.0))  # doctest: +SKIP
        >>> res.scores_after[:, 1] > res.scores_before[:, 1]  # woman more visible  # doctest: +SKIP
    """
    cfg = config or PerturbationConfig()
    if query_embeds.ndim != 2 or query_embeds.shape[0] != 2:
        raise ValueError(
            f"expected 2 query embeddings (original, adversarial), got {tuple(query_embeds.shape)}"
        )
    t0 = t.detach()
    with torch.no_grad():
        logits0 = _logits(model, t0, query_embeds)
    x = t0.clone()
    if cfg.eps > 0:
        lower, upper = t0 - cfg.eps, t0 + cfg.eps
        for _ in range(cfg.steps):
            with torch.enable_grad():
                x_var = x.detach().requires_grad_(True)
                loss = objective(_logits(model, x_var, query_embeds), cfg.reduction).sum()
                (grad,) = torch.autograd.grad(loss, x_var)
            # images are independent, so the batch sum gives each image its own gradient
            x = torch.minimum(torch.maximum(x - cfg.alpha * grad.sign(), lower), upper).detach()
    with torch.no_grad():
        logits1 = _logits(model, x, query_embeds)
    return PerturbationResult(
        t=x,
        scores_before=owl_scores(logits0),
        scores_after=owl_scores(logits1),
        logits_before=logits0.float().amax(dim=1),
        logits_after=logits1.float().amax(dim=1),
        objective_before=objective(logits0.float(), cfg.reduction),
        objective_after=objective(logits1.float(), cfg.reduction),
        linf=(x.float() - t0.float()).abs().flatten(1).amax(dim=1),
    )
