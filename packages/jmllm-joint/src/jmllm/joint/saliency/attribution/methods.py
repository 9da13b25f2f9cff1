"""The attribution methods on J, each a map over ``t``'s patch grid for one answer target.

Every method explains the same quantity where it has one — the raw logit of the explained
token(s) at their answer positions, teacher-forced after the prompt — and returns an
:class:`~jmllm.joint.saliency.attribution.base.Attribution`. Sources:

- ``ga``, ``ga_coord``, ``ga_any``: Gradient Alignment (Giulivi and Boracchi, BMVC 2024), the
  ``class``, ``coord`` and ``any`` weightings, through :class:`~jmllm.joint.GradientAlignment`'s
  default path; the grid score of a patch is the painted map's mean over the patch's cell.
- ``gradient``: the plain gradient, ``‖∂ logit / ∂ t_k‖₂`` per patch (Simonyan et al., ICLR
  2014 workshop, on ``t`` instead of pixels).
- ``gradient_x_input``: ``Σ_d (∂ logit / ∂ t_{k,d}) · t_{k,d}`` per patch (Shrikumar et al.,
  2016; signed: the first-order contribution of the patch).
- ``integrated_gradients``: Sundararajan et al. (ICML 2017), through Captum's
  ``IntegratedGradients`` on ``t`` from a baseline embedding, summed per patch (signed).
- ``attention``: the last decoder layer's attention, averaged over heads, from the row that
  predicts the explained token to the image tokens (as LVLM-Interpret shows it, Stan et al.,
  2024).
- ``attention_rollout``: attention rollout (Abnar and Zuidema, ACL 2020): every layer's
  head-averaged attention plus the identity (the residual), rows renormalised, multiplied from
  the first layer to the last; the same row and columns.
- ``logit_lens``: every image token's hidden state after a decoder layer (default the last),
  through the final norm and the LM head, read at the explained token's id (nostalgebraist,
  2020). It is the activation TAM starts from (Li et al., ICCV 2025, Token Activation Maps);
  TAM's estimated causal inference (which removes what earlier answer tokens contribute) and its
  rank Gaussian filter are not applied.
- ``random``: a uniform random score per patch, seeded per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from jmllm.joint.model.internals import (
    final_norm,
    image_token_positions,
    lm_head,
    run_language_model,
)
from jmllm.joint.saliency import GAResult, GradientAlignment
from jmllm.joint.saliency.attribution.base import (
    BASELINES,
    Attribution,
    AttributionError,
    AttributionMethod,
    Request,
    baseline_t,
    target_logit,
)

IG_METHODS = (
    "riemann_trapezoid",
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
)
# The path from a blank image to a scene is not smooth: on the toy world the logit jumps within a
# few per cent of it, so integrated gradients need many points. At 64 trapezoid steps the patches
# sum to the logit's change within about 5 % on the toy world's words; at 16 steps, or with
# Captum's Gauss–Legendre nodes, they often miss it by half (docs/faithfulness.md).
IG_STEPS = 64


class GradientAlignmentMethod(AttributionMethod):
    """Gradient Alignment (GA) through :class:`~jmllm.joint.GradientAlignment`'s default path.

    Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their
    Vision Perception*, BMVC 2024 (arXiv 2405.14612). The map is GA's own (OWL-ViT's boxes
    painted with their weights); the grid score of a patch is that map's mean over the patch's
    cell of the squashed image, so deletion removes what GA's map points at.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        weighting: ``class`` (``ga``), ``coord`` (``ga_coord``) or ``any`` (``ga_any``).
        ga: a :class:`~jmllm.joint.GradientAlignment` to use (methods of several weightings
            share one, so GA runs once per request); None makes one with its defaults.

    Example:
        >>> method = GradientAlignmentMethod(model, "coord")  # doctest: +SKIP
        >>> method.attribute(img, "What's in the image?", "circle", queries=["circle"])  # doctest: +SKIP
    """

    name = "ga"
    source = "Giulivi and Boracchi, BMVC 2024 (arXiv 2405.14612)"
    NAMES: ClassVar[dict[str, str]] = {"class": "ga", "coord": "ga_coord", "any": "ga_any"}

    def __init__(
        self, model: Any, weighting: str = "class", *, ga: GradientAlignment | None = None
    ) -> None:
        super().__init__(model)
        if weighting not in self.NAMES:
            raise AttributionError(
                f"weighting: {weighting!r} is not one of {', '.join(self.NAMES)}"
            )
        self.weighting = weighting
        self.name = self.NAMES[weighting]  # type: ignore[misc]
        self.ga = ga if ga is not None else GradientAlignment(model, cache_size=4)

    def bound_to(self, model: Any) -> AttributionMethod:
        clone = super().bound_to(model)
        assert isinstance(clone, GradientAlignmentMethod)
        # the OWL side (norms, boxes) depends on OWL-ViT and t only: the variant shares it
        variant = GradientAlignment(model, cache_size=self.ga.cache_size)
        variant.__dict__.update(
            {k: v for k, v in self.ga.__dict__.items() if k not in ("model", "_cache")}
        )
        variant._cache = self.ga._cache
        clone.ga = variant
        return clone

    def result(self, request: Request) -> GAResult:
        """GA's result for the request (computed once per model and GA, shared by weightings)."""
        key = ("ga", id(self.model), id(self.ga._cache))
        cached = request.cache.get(key)
        if cached is None:
            source = request.emb if request.emb is not None else request.t
            cached = self.ga.attribute(
                source,
                request.prompt,
                request.target,
                request.queries,
                answer=request.answer,
                template=request.template,
                occurrence=request.occurrence,
            )
            request.cache[key] = cached
        return cached

    def attribute_request(self, request: Request) -> Attribution:
        result = self.result(request)
        weighting = self.weighting
        side = int(self.model.owl.config.vision_config.image_size)
        G = request.grid_side
        cell = max(1, side // G)
        square = result.map(weighting, size=(G * cell, G * cell))  # (G·c, G·c)
        scores = square.reshape(G, cell, G, cell).mean(axis=(1, 3))  # (G, G) per-cell means

        def paint(size: tuple[int, int]) -> np.ndarray:
            if tuple(size) == tuple(result.image_size):
                return result.map(weighting)
            return result.map(weighting, size=size)

        return self._result(request, torch.from_numpy(scores), painter=paint, detail=result)


def llm_gradient(model: Any, request: Request) -> torch.Tensor:
    """``∂ logit / ∂ t`` (1, 1 + N, D) float32 of the explained tokens' summed logits, once per
    model and request (the plain-gradient and gradient × input methods share it)."""
    key = ("llm_gradient", id(model))
    cached = request.cache.get(key)
    if cached is None:
        t = request.t.detach().clone().float().requires_grad_(True)
        with torch.enable_grad():
            score = target_logit(model, request, t).sum()
            (grad,) = torch.autograd.grad(score, t)
        cached = grad.detach().float()
        request.cache[key] = cached
    return cached


class GradientMethod(AttributionMethod):
    """The plain gradient: ``‖∂ logit / ∂ t_k‖₂`` for every patch row ``k`` of ``t``.

    Simonyan, Vedaldi and Zisserman, *Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps*, ICLR 2014 workshop — on the shared embedding ``t``
    instead of the pixels (the same map as GA's ``gradient`` baseline).

    Example:
        >>> GradientMethod(model).attribute(img, "What's in the image?", "circle")  # doctest: +SKIP
    """

    name = "gradient"
    source = "Simonyan et al., ICLR 2014 workshop (arXiv 1312.6034)"

    def attribute_request(self, request: Request) -> Attribution:
        g = llm_gradient(self.model, request)
        return self._result(request, torch.linalg.vector_norm(g[0, 1:], dim=-1))


class GradientXInputMethod(AttributionMethod):
    """Gradient × input on ``t``: ``Σ_d (∂ logit / ∂ t_{k,d}) · t_{k,d}`` per patch (signed).

    Shrikumar, Greenside, Shcherbina and Kundaje, *Not Just a Black Box: Learning Important
    Features Through Propagating Activation Differences*, 2016 (arXiv 1605.01713). Summed over
    the embedding's channels, it is the first-order Taylor contribution of patch ``k`` to the
    logit against a zero embedding.

    Example:
        >>> GradientXInputMethod(model).attribute(img, "What's in the image?", "circle")  # doctest: +SKIP
    """

    name = "gradient_x_input"
    source = "Shrikumar et al., 2016 (arXiv 1605.01713)"
    signed = True

    def attribute_request(self, request: Request) -> Attribution:
        g = llm_gradient(self.model, request)
        t = request.t.float().to(g.device)
        return self._result(request, (g[0, 1:] * t[0, 1:]).sum(-1))


class IntegratedGradientsMethod(AttributionMethod):
    """Integrated gradients on ``t`` (Captum's ``IntegratedGradients``), summed per patch.

    Sundararajan, Taly and Yan, *Axiomatic Attribution for Deep Networks*, ICML 2017. The path
    runs from a baseline embedding (:func:`~jmllm.joint.saliency.attribution.base.baseline_t`: by default
    ``t`` of the blank image, the same baseline deletion and insertion use) to ``t``; the
    attribution of patch ``k`` is the sum over its channels (signed; by completeness all
    patches sum to the logit's change along the path).

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        steps: integration steps (Captum's ``n_steps``; default 64).
        method: Captum's quadrature: ``riemann_trapezoid`` (default: robust to the kinks of a
            ReLU network's path) or ``gausslegendre`` (Captum's default), or another Riemann rule.
        baseline: ``blank``, ``blur`` or ``zero``.
        batch_size: steps per forward (Captum's ``internal_batch_size``; None: all at once).

    Example:
        >>> ig = IntegratedGradientsMethod(model, steps=32)  # doctest: +SKIP
        >>> ig.attribute(img, "What's in the image?", "circle").scores.sum()  # doctest: +SKIP
    """

    name = "integrated_gradients"
    source = "Sundararajan et al., ICML 2017 (arXiv 1703.01365), via Captum"
    signed = True

    def __init__(
        self,
        model: Any,
        steps: int = IG_STEPS,
        method: str = "riemann_trapezoid",
        baseline: str = "blank",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model)
        if not isinstance(steps, int) or steps < 1:
            raise AttributionError(f"steps: must be a positive integer, got {steps!r}")
        if method not in IG_METHODS:
            raise AttributionError(f"method: {method!r} is not one of {', '.join(IG_METHODS)}")
        if baseline not in BASELINES:
            raise AttributionError(f"baseline: {baseline!r} is not one of {', '.join(BASELINES)}")
        self.steps = steps
        self.method = method
        self.baseline = baseline
        self.batch_size = batch_size

    def attribute_request(self, request: Request) -> Attribution:
        try:
            from captum.attr import IntegratedGradients
        except ImportError:  # a declared dependency: only a broken install lacks it
            raise ImportError(
                "integrated gradients needs Captum: pip install 'jmllm-joint' (captum>=0.8)"
            ) from None
        model = self.model

        def forward(t: torch.Tensor) -> torch.Tensor:
            return target_logit(model, request, t)

        base = baseline_t(model, request, self.baseline).float()
        with torch.enable_grad():
            attributions = IntegratedGradients(forward).attribute(
                request.t.float(),
                baselines=base,
                n_steps=self.steps,
                method=self.method,
                internal_batch_size=self.batch_size,
            )
        return self._result(request, attributions[0, 1:].sum(-1))


def _attentions(model: Any, request: Request) -> list[torch.Tensor]:
    """Every layer's head-averaged attention (L, L) of the request, one forward per model."""
    key = ("attentions", id(model))
    cached = request.cache.get(key)
    if cached is None:
        with torch.inference_mode():
            out = run_language_model(
                model, request.t, request.scored_ids, rows=request.rows, attentions=True
            )
        assert out.attentions is not None
        cached = [a[0].mean(0) for a in out.attentions]  # (H, L, L) → (L, L) per layer
        request.cache[key] = cached
    return cached


class AttentionMethod(AttributionMethod):
    """The language model's attention from the explained token's row to the image tokens.

    The last decoder layer's attention weights, averaged over heads, in the row that predicts
    the explained token (the position whose logit is the token's), at the N image-token columns
    (a word of several tokens: summed over its rows). LVLM-Interpret shows these raw attention
    maps (Stan et al., *LVLM-Interpret: An Interpretability Tool for Large Vision-Language
    Models*, CVPR 2024 workshops, arXiv 2404.03118).

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        layer: which decoder layer (default -1, the last).

    Example:
        >>> AttentionMethod(model).attribute(img, "What's in the image?", "circle")  # doctest: +SKIP
    """

    name = "attention"
    source = "LVLM-Interpret, Stan et al., CVPR 2024 workshops (arXiv 2404.03118)"

    def __init__(self, model: Any, layer: int = -1) -> None:
        super().__init__(model)
        self.layer = layer

    def attribute_request(self, request: Request) -> Attribution:
        layers = _attentions(self.model, request)
        if not -len(layers) <= self.layer < len(layers):
            raise AttributionError(f"layer: {self.layer} is not one of {len(layers)} layers")
        attention = layers[self.layer]
        columns = image_token_positions(self.model, request.input_ids)
        return self._result(request, attention[request.rows][:, columns].sum(0))


class AttentionRolloutMethod(AttributionMethod):
    """Attention rollout from the explained token's row to the image tokens.

    Abnar and Zuidema, *Quantifying Attention Flow in Transformers*, ACL 2020: per layer
    ``Ā = ½ · mean_heads(A) + ½ · I`` (the residual connection), rows renormalised to sum to 1,
    and ``R = Ā_L ⋯ Ā_1``; the map is ``R``'s row that predicts the explained token at the image
    columns.

    Example:
        >>> AttentionRolloutMethod(model).attribute(img, "What's in the image?", "circle")  # doctest: +SKIP
    """

    name = "attention_rollout"
    source = "Abnar and Zuidema, ACL 2020 (arXiv 2005.00928)"

    def attribute_request(self, request: Request) -> Attribution:
        layers = _attentions(self.model, request)
        L = layers[0].shape[-1]
        eye = torch.eye(L, dtype=torch.float64)
        rollout = eye
        for attention in layers:
            mixed = 0.5 * attention.double() + 0.5 * eye
            mixed = mixed / mixed.sum(-1, keepdim=True)
            rollout = mixed @ rollout
        columns = image_token_positions(self.model, request.input_ids)
        return self._result(request, rollout[request.rows][:, columns].sum(0))


class LogitLensMethod(AttributionMethod):
    """Logit lens on the image tokens: each image token's hidden state, through the final norm
    and the LM head, read at the explained token's id.

    nostalgebraist, *interpreting GPT: the logit lens* (LessWrong, 2020). This is the per-token
    activation that TAM starts from (Li et al., *Token Activation Map to Visually Explain
    Multimodal LLMs*, ICCV 2025); TAM's estimated causal inference, which subtracts what the
    earlier answer tokens contribute, and its rank Gaussian filter are not applied here.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        layer: the hidden state after decoder layer ``layer`` (default -1, the last; 0 would be
            the input embeddings ``W(t)`` themselves).

    Example:
        >>> LogitLensMethod(model).attribute(img, "What's in the image?", "circle")  # doctest: +SKIP
    """

    name = "logit_lens"
    source = "nostalgebraist, 2020; the activation of TAM, Li et al., ICCV 2025 (arXiv 2506.23270)"

    def __init__(self, model: Any, layer: int = -1) -> None:
        super().__init__(model)
        self.layer = layer

    def attribute_request(self, request: Request) -> Attribution:
        model = self.model
        key = ("hidden_states", id(model))
        hidden = request.cache.get(key)
        if hidden is None:
            with torch.inference_mode():
                out = run_language_model(
                    model, request.t, request.scored_ids, rows=request.rows, hidden_states=True
                )
            hidden = out.hidden_states
            request.cache[key] = hidden
        assert hidden is not None
        layers = len(hidden) - 1
        index = self.layer if self.layer >= 0 else layers + 1 + self.layer
        if not 0 <= index <= layers:
            raise AttributionError(f"layer: {self.layer} is not one of {layers} layers")
        columns = image_token_positions(model, request.input_ids)
        states = hidden[index][0, columns]  # (N, D)
        with torch.inference_mode():
            head = lm_head(model)
            dtype = next(head.parameters()).dtype
            logits = head(final_norm(model)(states.to(dtype))).float()  # (N, V)
        ids = request.target_ids.to(logits.device)
        return self._result(request, logits[:, ids].sum(-1))


class RandomMethod(AttributionMethod):
    """A uniform random score per patch, seeded by ``seed`` and the request (``t`` and the
    target), so a request always gets the same map: the floor every method must beat.

    Example:
        >>> RandomMethod(model, seed=1).attribute(img, "What's in the image?", "circle")  # doctest: +SKIP
    """

    name = "random"
    source = "baseline (Adebayo et al., NeurIPS 2018, use it as the floor)"

    def __init__(self, model: Any, seed: int = 0) -> None:
        super().__init__(model)
        self.seed = seed

    def attribute_request(self, request: Request) -> Attribution:
        rng = np.random.default_rng([self.seed, int(request.digest(), 16)])
        return self._result(request, torch.from_numpy(rng.random(request.num_patches)))


METHODS: dict[str, type[AttributionMethod]] = {
    "ga": GradientAlignmentMethod,
    "ga_coord": GradientAlignmentMethod,
    "ga_any": GradientAlignmentMethod,
    "gradient": GradientMethod,
    "gradient_x_input": GradientXInputMethod,
    "integrated_gradients": IntegratedGradientsMethod,
    "attention": AttentionMethod,
    "attention_rollout": AttentionRolloutMethod,
    "logit_lens": LogitLensMethod,
    "random": RandomMethod,
}
# The seven the faithfulness report needs at least (GA's default weighting, one attention).
CORE_METHODS: tuple[str, ...] = (
    "ga",
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "attention",
    "logit_lens",
    "random",
)


def method_names() -> list[str]:
    """Every method's name, GA's first."""
    return list(METHODS)


def get_method(name: str, model: Any, **options: Any) -> AttributionMethod:
    """The method called ``name`` on J.

    Args:
        name: one of :func:`method_names`.
        model: a :class:`~jmllm.joint.JointModel`.
        **options: the method's own options (``steps``, ``baseline``, ``layer``, ``seed``, ``ga``).

    Raises:
        AttributionError: an unknown name (the message lists the known ones).

    Example:
        >>> get_method("logit_lens", model, layer=-2)  # doctest: +SKIP
    """
    cls = METHODS.get(name)
    if cls is None:
        raise AttributionError(f"method: {name!r} is not one of {', '.join(METHODS)}")
    if cls is GradientAlignmentMethod:
        weighting = {v: k for k, v in GradientAlignmentMethod.NAMES.items()}[name]
        return GradientAlignmentMethod(model, weighting, **options)
    return cls(model, **options)


def make_methods(
    names: Sequence[str],
    model: Any,
    *,
    ig_steps: int = IG_STEPS,
    baseline: str = "blank",
    seed: int = 0,
    ga: GradientAlignment | None = None,
    batch_size: int | None = None,
) -> dict[str, AttributionMethod]:
    """Several methods on one J, GA's weightings sharing one :class:`GradientAlignment` (GA runs
    once per request for all of them).

    Args:
        names: method names, in the order wanted.
        model: a :class:`~jmllm.joint.JointModel`.
        ig_steps: integrated gradients' steps; baseline: its path's start; seed: the random
            method's seed.
        ga: the GradientAlignment to share (default: a new one with its defaults).
        batch_size: integrated gradients' steps per forward (None: all at once).

    Example:
        >>> methods = make_methods(["ga", "ga_coord", "random"], model)  # doctest: +SKIP
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise AttributionError(
            f"method: {', '.join(map(repr, unknown))} not among {', '.join(METHODS)}"
        )
    shared = ga if ga is not None else GradientAlignment(model, cache_size=4)
    options: dict[str, dict[str, Any]] = {
        "integrated_gradients": {"steps": ig_steps, "baseline": baseline, "batch_size": batch_size},
        "random": {"seed": seed},
    }
    made: dict[str, AttributionMethod] = {}
    for name in dict.fromkeys(names):
        extra = (
            {"ga": shared} if METHODS[name] is GradientAlignmentMethod else options.get(name, {})
        )
        made[name] = get_method(name, model, **extra)
    return made
