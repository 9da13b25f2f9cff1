"""Gradient Alignment (GA) saliency: explain any answer token of J (DESIGN §1.3).

Giulivi & Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception*, BMVC 2024 (arXiv 2405.14612). One embedding ``t`` (B=1, 1 + N, D, CLS first) feeds
both LLaVA (through W) and OWL-ViT's last layer + heads. For the explained token,

    g_L     = ∂ logit_token / ∂ t                      (raw logit at its answer position)
    g_{k,c} = ∂ O^OWL_{k,c} / ∂ t                       (patch k, channel c)
    s_{k,c} = cos(g_{k,c}, g_L)

with channels c = one class logit per text query, then the four box coordinates ``cx, cy, w, h``.
The box channels are taken *before* the sigmoid: the sigmoid's derivative is a positive scalar,
so the cosine is the same as after it (what the authors' scripts use), but pre-sigmoid gradients
never underflow to zero on saturated boxes. Class and box similarities are then min–max normalised
separately, and every patch paints its predicted box with its weight (pixel-wise maximum).
As in the authors' scripts, by default the box corners are truncated to pixels (``int()``,
``box_rounding="truncate"``; ``"outward"`` floors the top-left and ceils the bottom-right). With
several queries the ``class`` map weighs each box by the channel of the query that names the
object the explained word refers to (``class_query="matching"``, :func:`matching_query`: "blue"
in "a blue triangle" → the triangle's query; the maximum over the queries when no query names
it). The authors' ``class_id=[0]`` was written for one query, the object itself, and with one
query every mode is that query; ``"first"`` keeps its letter with several queries and ``"max"``
takes the maximum. ``docs/fidelity.md`` lists every such choice.

How it is computed, exactly and fast:

- numerators ``⟨g_{k,c}, g_L⟩`` for all (k, c): one forward-mode JVP of t ↦ O^OWL(t), tangent g_L;
- norms ``‖g_{k,c}‖``: independent of the token, so computed once per (image, queries) and reused.
  O^OWL_{k,·} reads only rows {CLS, k} of the last encoder layer's output, so each gradient is one
  backward through that layer restricted to those two output rows: two attention query rows
  against all keys/values plus the row-wise MLP. The key and value projections are folded out of
  the per-output work (``K``-gradients become ``ds · (Q_i W_K)``, ``V``-gradients become
  ``p · (dA_i W_V)``), so every output costs O((1 + N) · 4H · D) instead of a full backward's
  O((1 + N) · D²). Batched with ``torch.func`` (vmap of jacrev/vjp), chunked over patches.

The naive reference — one ``torch.autograd.grad`` call per output through the modules' own
forward — is :func:`naive_owl_gradients`; tests and ``benchmarks/ga_saliency.py`` compare both.

The package's parts, each importing only those before it: :mod:`~jmllm.joint.saliency.gradients`
(O^OWL as a function of ``t``, its gradients, the similarities), :mod:`~jmllm.joint.saliency.maps`
(the weightings and the painted maps), :mod:`~jmllm.joint.saliency.answers` (the answer's tokens
and words, the target), :mod:`~jmllm.joint.saliency.results` (:class:`GAResult` and
:class:`AnswerExplanation`, the results and their maps) and :mod:`~jmllm.joint.saliency.api`
(:class:`GradientAlignment`, which computes them). Every name is importable from
``jmllm.joint.saliency``.
"""

from __future__ import annotations

from jmllm.joint.saliency.answers import (
    _WORD as _WORD,
)
from jmllm.joint.saliency.answers import (
    AnswerToken,
    AnswerWord,
    GAError,
    QueryMatch,
    answer_tokens,
    answer_words,
    matching_query,
    names_a_query,
    resolve_target,
)
from jmllm.joint.saliency.answers import (
    _template_name as _template_name,
)
from jmllm.joint.saliency.api import AnswerExplanation, GAResult, GradientAlignment
from jmllm.joint.saliency.gradients import (
    BOX_CHANNELS,
    OwlHeadGradients,
    cosine_similarities,
    minmax,
    naive_owl_gradients,
    normalise_similarities,
    owl_outputs_reference,
)
from jmllm.joint.saliency.maps import (
    BOX_ROUNDINGS,
    CLASS_QUERY_MODES,
    WEIGHTINGS,
    box_pixels,
    paint_boxes,
    patch_grid_map,
    patch_weights,
)

__all__ = [
    "BOX_CHANNELS",
    "BOX_ROUNDINGS",
    "CLASS_QUERY_MODES",
    "WEIGHTINGS",
    "AnswerExplanation",
    "AnswerToken",
    "AnswerWord",
    "GAError",
    "GAResult",
    "GradientAlignment",
    "OwlHeadGradients",
    "QueryMatch",
    "answer_tokens",
    "answer_words",
    "box_pixels",
    "cosine_similarities",
    "matching_query",
    "minmax",
    "naive_owl_gradients",
    "names_a_query",
    "normalise_similarities",
    "owl_outputs_reference",
    "paint_boxes",
    "patch_grid_map",
    "patch_weights",
    "resolve_target",
]
