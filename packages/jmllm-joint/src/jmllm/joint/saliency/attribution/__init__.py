"""Attribution methods on J, one interface: GA beside the plain gradient, gradient × input,
integrated gradients, attention (last layer, rollout), a logit lens and random.

Captum-style: the model goes into the constructor, :meth:`AttributionMethod.attribute` explains
one target of J's answer and returns an :class:`Attribution` — a score per patch of ``t``'s grid
(:attr:`Attribution.scores`, :attr:`Attribution.grid`), painted at the image's size by
:meth:`Attribution.map`. The package's parts, each importing only those before it:
:mod:`~jmllm.joint.saliency.attribution.base` (the request, the result, baselines, the target's
probability) and :mod:`~jmllm.joint.saliency.attribution.methods` (the methods and their sources). The
language model's internals come from :mod:`jmllm.joint.model.internals`.

Example:
    >>> from jmllm.joint.saliency.attribution import get_method
    >>> from jmllm.joint.toy import load_toy_joint
    >>> from jmllm.joint.toy.scenes import make_scene
    >>> model = load_toy_joint()
    >>> scene = make_scene("heldout", 0)
    >>> result = get_method("integrated_gradients", model).attribute(
    ...     scene.image, "What's in the image?", scene.objects[0].shape,
    ...     answer=f"The image shows a {scene.objects[0].name}")
    >>> result.grid.shape, result.map().shape
    ((8, 8), (128, 128))
"""

from __future__ import annotations

from jmllm.joint.saliency.attribution.base import (
    BASELINES,
    Attribution,
    AttributionError,
    AttributionMethod,
    Request,
    baseline_input,
    baseline_t,
    model_input,
    prepare_request,
    target_log_probs,
    target_logit,
)
from jmllm.joint.saliency.attribution.methods import (
    CORE_METHODS,
    IG_STEPS,
    METHODS,
    AttentionMethod,
    AttentionRolloutMethod,
    GradientAlignmentMethod,
    GradientMethod,
    GradientXInputMethod,
    IntegratedGradientsMethod,
    LogitLensMethod,
    RandomMethod,
    get_method,
    make_methods,
    method_names,
)

__all__ = [
    "BASELINES",
    "CORE_METHODS",
    "IG_STEPS",
    "METHODS",
    "AttentionMethod",
    "AttentionRolloutMethod",
    "Attribution",
    "AttributionError",
    "AttributionMethod",
    "GradientAlignmentMethod",
    "GradientMethod",
    "GradientXInputMethod",
    "IntegratedGradientsMethod",
    "LogitLensMethod",
    "RandomMethod",
    "Request",
    "baseline_input",
    "baseline_t",
    "get_method",
    "make_methods",
    "method_names",
    "model_input",
    "prepare_request",
    "target_log_probs",
    "target_logit",
]
