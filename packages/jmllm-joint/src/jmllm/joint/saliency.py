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
``box_rounding="truncate"``; ``"outward"`` floors the top-left and ceils the bottom-right) and with
several queries the ``class`` map weighs each box by the **first** query's channel
(``class_query="first"``; ``"max"`` takes the maximum over the queries). ``docs/fidelity.md``
lists every such choice.

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
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.func import jvp, vjp

from jmllm.joint.chat import INTERACTIVE_TEMPLATE, ConversationTemplate, get_template

logger = logging.getLogger(__name__)

BOX_CHANNELS = ("cx", "cy", "w", "h")


# ---------------------------------------------------------------------------------------------
# O^OWL as a function of t
# ---------------------------------------------------------------------------------------------


def _vision(owl: Any) -> Any:
    return owl.owlvit.vision_model


def _as_queries(query_embeds: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(Q, D_q) or (1, Q, D_q) query embeddings as (Q, D_q) in ``like``'s dtype/device."""
    if query_embeds.dim() == 3:
        if query_embeds.shape[0] != 1:
            raise ValueError(
                f"query_embeds: expected one image's queries, got {query_embeds.shape}"
            )
        query_embeds = query_embeds[0]
    if query_embeds.dim() != 2 or query_embeds.shape[0] == 0:
        raise ValueError(f"query_embeds: expected (Q >= 1, D_q), got {tuple(query_embeds.shape)}")
    return query_embeds.to(device=like.device, dtype=like.dtype)


def _heads_from_features(owl: Any, feats: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Class logits and pre-sigmoid box logits (without the constant grid bias) of merged patch
    features ``feats`` (..., D): (..., Q + 4). Uses the heads' own modules."""
    head = owl.class_head
    image_class = head.dense0(feats)  # (..., D_q)
    image_class = image_class / (torch.linalg.norm(image_class, dim=-1, keepdim=True) + 1e-6)
    q = queries / (torch.linalg.norm(queries, dim=-1, keepdim=True) + 1e-6)  # (Q, D_q)
    logits = image_class @ q.T  # (..., Q)
    shift = head.logit_shift(feats)  # (..., 1)
    scale = head.elu(head.logit_scale(feats)) + 1
    class_logits = (logits + shift) * scale
    box_logits = owl.box_head(feats)  # (..., 4)
    return torch.cat([class_logits, box_logits], dim=-1)


def owl_outputs_reference(owl: Any, t: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
    """O^OWL of ``t`` through the modules' own forward methods: (N, Q + 4).

    The last encoder layer is called as a module (whatever attention implementation the model
    was loaded with), then post-layernorm, the CLS merge, the layer norm, the class head and the
    box head, exactly as ``OwlViTForObjectDetection`` chains them. Box channels are the box head's
    logits plus the grid bias, *before* the sigmoid (``sigmoid`` of them are the boxes).

    Args:
        owl: an ``OwlViTForObjectDetection``.
        t: (1, 1 + N, D) penultimate hidden state, CLS first.
        query_embeds: (Q, D_q) text-query embeddings.

    Returns:
        (N, Q + 4): class logits, then ``cx, cy, w, h`` logits.
    """
    vision = _vision(owl)
    hidden = vision.encoder.layers[-1](t, attention_mask=None)  # (1, 1 + N, D)
    image_embeds = vision.post_layernorm(hidden)
    merged = image_embeds[:, 1:, :] * image_embeds[:, :1, :]  # (1, N, D)
    feats = owl.layer_norm(merged)
    queries = query_embeds if query_embeds.dim() == 3 else query_embeds.unsqueeze(0)
    class_logits, _ = owl.class_head(feats, queries.to(feats.dtype), None)  # (1, N, Q)
    box_logits = owl.box_head(feats) + owl.box_bias.to(feats)  # (1, N, 4)
    return torch.cat([class_logits, box_logits], dim=-1)[0]


class OwlHeadGradients:
    """O^OWL(t) for one image and query set, with the fast exact GA machinery.

    The last encoder layer's attention is re-expressed with the layer's own projection weights
    (eager softmax attention, no mask), because forward-mode AD is not implemented for fused
    attention kernels and the attention probabilities are needed for the row-restricted backward;
    everything else calls the modules themselves. :meth:`outputs` equals
    :func:`owl_outputs_reference` (tested).

    Args:
        owl: an ``OwlViTForObjectDetection``.
        t: (1, 1 + N, D) penultimate hidden state, CLS first.
        query_embeds: (Q, D_q) text-query embeddings.

    Example:
        >>> heads = OwlHeadGradients(owl, t, owl_query_embeds)  # doctest: +SKIP
        >>> norms = heads.gradient_norms()  # (N, Q + 4), once per (image, queries)  # doctest: +SKIP
        >>> numerators = heads.numerators(g_llm)  # (N, Q + 4), one JVP per token  # doctest: +SKIP
    """

    def __init__(self, owl: Any, t: torch.Tensor, query_embeds: torch.Tensor) -> None:
        if t.dim() != 3 or t.shape[0] != 1:
            raise ValueError(f"t: expected (1, 1 + N, D), got {tuple(t.shape)}")
        self.owl = owl
        vision = _vision(owl)
        self.layer = vision.encoder.layers[-1]
        self.post_layernorm = vision.post_layernorm
        dtype = self.layer.layer_norm1.weight.dtype
        self.t = t.detach().to(dtype)
        self.queries = _as_queries(query_embeds, self.t)
        attn = self.layer.self_attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        self.num_patches = t.shape[1] - 1
        self.num_queries = self.queries.shape[0]
        self.box_bias = owl.box_bias.to(self.t)
        if self.box_bias.shape[0] != self.num_patches:
            raise ValueError(
                f"t has {self.num_patches} patch tokens but OWL-ViT's grid has "
                f"{self.box_bias.shape[0]}"
            )

    @property
    def num_channels(self) -> int:
        """C = Q + 4 outputs per patch."""
        return self.num_queries + 4

    # -- forward -------------------------------------------------------------------------------

    def _attention(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Eager multi-head attention of the layer-normed rows ``x`` (T, D).

        Returns the output (T, D) and, for the backward, Q, K, V (T, H, d) and P (H, T, T).
        """
        attn = self.layer.self_attn
        T = x.shape[0]
        H, d = self.num_heads, self.head_dim
        q = attn.q_proj(x).view(T, H, d)
        k = attn.k_proj(x).view(T, H, d)
        v = attn.v_proj(x).view(T, H, d)
        scores = torch.einsum("ihd,jhd->hij", q, k) * self.scale  # (H, T, T)
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("hij,jhd->ihd", probs, v).reshape(T, H * d)  # (T, D)
        return attn.out_proj(out), q, k, v, probs

    def _merged_features(self, y0: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
        """Post-layernorm, CLS merge and layer norm of the layer outputs (CLS row, patch rows)."""
        return self.owl.layer_norm(self.post_layernorm(yk) * self.post_layernorm(y0))

    def _layer_output(self, t: torch.Tensor) -> torch.Tensor:
        """The last encoder layer on ``t`` (T, D), with the attention re-expressed: (T, D)."""
        attn_out = self._attention(self.layer.layer_norm1(t))[0]
        h = t + attn_out
        return h + self.layer.mlp(self.layer.layer_norm2(h))

    def _outputs_of(self, t: torch.Tensor) -> torch.Tensor:
        y = self._layer_output(t)  # (T, D)
        feats = self._merged_features(y[:1], y[1:])  # (N, D)
        return _heads_from_features(self.owl, feats, self.queries) + torch.cat(
            [torch.zeros(self.num_patches, self.num_queries).to(self.box_bias), self.box_bias],
            dim=-1,
        )

    def outputs(self) -> torch.Tensor:
        """O^OWL(t): (N, Q + 4) class logits, then pre-sigmoid ``cx, cy, w, h``."""
        with torch.no_grad():
            return self._outputs_of(self.t[0])

    def boxes(self) -> torch.Tensor:
        """The predicted boxes (N, 4) ``cx, cy, w, h`` in [0, 1] of the squashed square."""
        return torch.sigmoid(self.outputs()[:, self.num_queries :])

    # -- numerators: one JVP per explained token --------------------------------------------------

    def numerators(self, g_llm: torch.Tensor) -> torch.Tensor:
        """``⟨g_{k,c}, g_L⟩`` for every (k, c): one forward-mode JVP with tangent ``g_L``.

        Args:
            g_llm: (1, 1 + N, D) or (1 + N, D) gradient of the token logit w.r.t. ``t``.

        Returns:
            (N, Q + 4).
        """
        tangent = g_llm.reshape(self.t.shape[1:]).to(self.t)
        with torch.no_grad():
            out = jvp(self._outputs_of, (self.t[0],), (tangent,))[1]
        return out

    # -- norms: once per (image, queries) ----------------------------------------------------------

    def gradient_norms(
        self,
        chunk_size: int | None = None,
        progress: bool = False,
        patches: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``‖g_{k,c}‖`` for every (k, c), exactly, via the row-restricted backward.

        Args:
            chunk_size: patches per batch; the peak memory is about
                ``chunk_size · (Q + 4) · 16 H · (1 + N + D)`` floats (default: ~128 MB worth).
            progress: show a tqdm bar over chunks.
            patches: only these patch indices (0-based, CLS excluded); None: all N.

        Returns:
            (N, Q + 4) float tensor, or (len(patches), Q + 4) rows in the given order.
        """
        t = self.t[0]  # (T, D)
        T, D = t.shape
        N, C, H, d = self.num_patches, self.num_channels, self.num_heads, self.head_dim
        layer, attn = self.layer, self.layer.self_attn
        if chunk_size is None:
            chunk_size = max(1, int(32_000_000 // (C * 16 * H * (T + D))))
        with torch.no_grad():
            ln1 = layer.layer_norm1
            mean = t.mean(-1, keepdim=True)
            var = t.var(-1, unbiased=False, keepdim=True)
            inv_std = torch.rsqrt(var + ln1.eps)  # (T, 1)
            x_hat = (t - mean) * inv_std  # (T, D)
            x = x_hat * ln1.weight + ln1.bias
            attn_out, q, k, v, probs = self._attention(x)
            h = t + attn_out  # (T, D) residual stream after attention
            y = h + layer.mlp(layer.layer_norm2(h))  # (T, D) layer output
            w_q = attn.q_proj.weight.view(H, d, D)
            w_k = attn.k_proj.weight.view(H, d, D)
            w_v = attn.v_proj.weight.view(H, d, D)
            w_o = attn.out_proj.weight  # (D, D): out = A @ w_o.T
            # K folded into the query side: Q_i^h W_K^h, (T, H, D). dx_j(K) = s Σ ds_ij^h q_fold_i^h
            q_fold = torch.einsum("ihd,hdD->ihD", q, w_k)
            # Row 0's MLP Jacobian is shared by every patch: ∂y_0/∂h_0, (D, D).
            jac_row0 = torch.func.jacrev(lambda r: r + layer.mlp(layer.layer_norm2(r)))(h[0])

        def heads_of(y0: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
            return _heads_from_features(self.owl, self._merged_features(y0, yk), self.queries)

        def mlp_rows(r: torch.Tensor) -> torch.Tensor:
            return r + layer.mlp(layer.layer_norm2(r))

        # One-hot cotangents: row (b, c) of a C-times repeated batch selects output c. Plain
        # matrix products over B·C rows (vmapping a vjp over C would expand the weights C times).
        eye = torch.eye(C, dtype=t.dtype, device=t.device)
        gamma = ln1.weight  # (D,)
        with torch.no_grad():
            # Per-row constants of the LayerNorm-1 backward and the folded projections, (T, ·).
            x_hat_norm2 = (x_hat * x_hat).sum(-1)  # (T,) ‖x̂_j‖² (= D up to eps)
            x_hat_sum = x_hat.sum(-1)  # (T,) 1ᵀx̂_j (= 0 up to rounding)
            z_k = ((x_hat * gamma) @ attn.k_proj.weight.T).view(T, H, d)  # (x̂_j⊙γ) W_K^T
            z_v = ((x_hat * gamma) @ attn.v_proj.weight.T).view(T, H, d)  # (x̂_j⊙γ) W_V^T
        wanted = torch.arange(N) if patches is None else torch.as_tensor(list(patches)).long()
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= N):
            raise ValueError(f"patches: indices must be in 0..{N - 1}")
        wanted = wanted.to(t.device)
        norms = torch.empty(wanted.numel(), C, dtype=t.dtype, device=t.device)
        starts: Iterable[int] = range(0, wanted.numel(), chunk_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="GA gradient norms", unit="chunk")
        with torch.no_grad():
            for start in starts:
                out_rows = torch.arange(start, min(start + chunk_size, wanted.numel()))
                rows = wanted[out_rows] + 1  # rows of t (CLS is row 0)
                B = rows.numel()
                batch = torch.arange(B, device=t.device)
                yk_rep = y[rows].repeat_interleave(C, dim=0)  # (B·C, D)
                heads_vjp = vjp(heads_of, y[0].expand_as(yk_rep), yk_rep)[1]
                u0, uk = heads_vjp(eye.repeat(B, 1))  # (B·C, D) each: ∂O/∂y_0, ∂O/∂y_k
                v0 = (u0 @ jac_row0).view(B, C, D)  # ∂O/∂h_0
                mlp_vjp = vjp(mlp_rows, h[rows].repeat_interleave(C, dim=0))[1]
                vk = mlp_vjp(uk)[0].view(B, C, D)  # ∂O/∂h_k
                dh = torch.stack([v0, vk], dim=2)  # (B, C, 2, D) cotangents at rows i ∈ {0, k}
                # Attention backward restricted to the two query rows.
                dattn = (dh @ w_o).view(B, C, 2, H, d)  # ∂O/∂A_i per head
                p_rows = torch.stack(
                    [probs[:, 0, :].expand(B, H, T), probs[:, rows, :].transpose(0, 1)], dim=1
                ).unsqueeze(1)  # (B, 1, 2, H, T)
                dp = torch.einsum("bcihd,jhd->bcihj", dattn, v)  # (B, C, 2, H, T)
                ds = p_rows * (dp - (p_rows * dp).sum(-1, keepdim=True))  # softmax backward
                dq = torch.einsum("bcihj,jhd->bcihd", ds, k) * self.scale  # (B, C, 2, H, d)
                # dx_j = Σ_r coeff_rj · basis_r over r = (type, i, h), 4H terms:
                #   K: coeff = scale·ds_ij^h, basis = Q_i^h W_K^h  (K folded into the query)
                #   V: coeff = p_ij^h,        basis = dA_i^h W_V^h (V folded after the average)
                coeff = torch.cat(
                    [(ds * self.scale).flatten(2, 3), p_rows.expand_as(ds).flatten(2, 3)], dim=2
                )  # (B, C, 4H, T)
                q_rows = torch.stack([q_fold[0].expand(B, H, D), q_fold[rows]], dim=1)
                a_fold = torch.einsum("bcihd,hdD->bcihD", dattn, w_v)  # (B, C, 2, H, D)
                basis = torch.cat(
                    [q_rows.unsqueeze(1).expand_as(a_fold).flatten(2, 3), a_fold.flatten(2, 3)],
                    dim=2,
                )  # (B, C, 4H, D)
                # LayerNorm-1 backward: dt_j = inv_std_j (z - mean(z) - x̂_j mean(z⊙x̂_j)), z = γ⊙dx_j.
                # ‖dt_j‖² from Gram terms, never materialising the (T, D) gradient:
                #   z_j = Σ_r coeff_rj m_r, m_r = γ⊙basis_r;  a_j = 1ᵀz_j / D;  b_j = x̂_jᵀz_j / D
                #   ‖dt_j‖² = inv_std² (‖z_j‖² − D a_j² − b_j² (2D − ‖x̂_j‖²) + 2 a_j b_j 1ᵀx̂_j)
                m = basis * gamma
                gram = m @ m.transpose(-1, -2)  # (B, C, 4H, 4H)
                quad = (coeff * (gram @ coeff)).sum(2)  # (B, C, T) ‖z_j‖²
                a = (coeff * m.sum(-1, keepdim=True)).sum(2) / D  # (B, C, T)
                e_k = torch.einsum(
                    "jhd,bihd->bihj", z_k, torch.stack([q[0].expand(B, H, d), q[rows]], 1)
                )
                e_v = torch.einsum("jhd,bcihd->bcihj", z_v, dattn)
                e = torch.cat([e_k.unsqueeze(1).expand_as(e_v).flatten(2, 3), e_v.flatten(2, 3)], 2)
                b = (coeff * e).sum(2) / D  # (B, C, T)
                sq = inv_std[:, 0] ** 2 * (
                    quad - D * a * a - b * b * (2 * D - x_hat_norm2) + 2 * a * b * x_hat_sum
                )  # (B, C, T)
                # Rows 0 and k also carry the query-side term dQ_i W_Q and the residual: exact.
                sq[:, :, 0] = 0
                sq[batch, :, rows] = 0
                special = torch.stack([torch.zeros_like(rows), rows], dim=1)  # (B, 2) row ids
                coeff_sp = coeff.gather(3, special[:, None, None, :].expand(B, C, 4 * H, 2))
                dx_sp = torch.einsum("bcrs,bcrD->bcsD", coeff_sp, basis)  # (B, C, 2, D)
                dx_sp = dx_sp + torch.einsum("bcihd,hdD->bciD", dq, w_q)
                x_hat_sp = x_hat[special].unsqueeze(1)  # (B, 1, 2, D)
                z = dx_sp * gamma
                dt_sp = (
                    z - z.mean(-1, keepdim=True) - x_hat_sp * (z * x_hat_sp).mean(-1, keepdim=True)
                ) * inv_std[special].unsqueeze(1) + dh  # residual around the attention
                total = sq.clamp(min=0).sum(-1) + (dt_sp * dt_sp).sum((-2, -1))  # (B, C)
                norms[out_rows.to(t.device)] = total.sqrt()
        return norms


def naive_owl_gradients(
    owl: Any,
    t: torch.Tensor,
    query_embeds: torch.Tensor,
    outputs: list[tuple[int, int]] | None = None,
    g_llm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive reference: one ``torch.autograd.grad`` call per OWL output.

    Args:
        owl: an ``OwlViTForObjectDetection``.
        t: (1, 1 + N, D).
        query_embeds: (Q, D_q).
        outputs: (patch, channel) pairs to differentiate; None: every one (slow on real sizes).
        g_llm: if given, also the numerators ``⟨g_{k,c}, g_L⟩``.

    Returns:
        norms (len(outputs),) and numerators (len(outputs),) or None.
    """
    t = t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = owl_outputs_reference(owl, t, query_embeds)  # (N, C)
        if outputs is None:
            outputs = [(k, c) for k in range(out.shape[0]) for c in range(out.shape[1])]
        norms, nums = [], []
        for k, c in outputs:
            (grad,) = torch.autograd.grad(out[k, c], t, retain_graph=True)
            norms.append(torch.linalg.vector_norm(grad))
            if g_llm is not None:
                nums.append((grad * g_llm.reshape(grad.shape).to(grad)).sum())
    return torch.stack(norms).detach(), (torch.stack(nums).detach() if g_llm is not None else None)


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float32 CPU copy (GA results are float32 whatever the model's dtype)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32)


def cosine_similarities(
    numerators: torch.Tensor, norms: torch.Tensor, g_llm_norm: float | torch.Tensor
) -> torch.Tensor:
    """``s = ⟨g, g_L⟩ / (‖g‖ ‖g_L‖)``; 0 where either gradient is zero (never NaN).

    Computed in float32 whatever the inputs' dtype (bf16 numerators and norms are promoted)."""
    numerators, norms = numerators.float(), norms.float()
    denom = norms * torch.as_tensor(g_llm_norm, dtype=norms.dtype, device=norms.device)
    return torch.where(denom > 0, numerators / denom.clamp(min=1e-30), torch.zeros_like(denom))


def minmax(values: torch.Tensor) -> torch.Tensor:
    """Min–max normalise all entries together to [0, 1]; a constant input gives all zeros."""
    lo, hi = values.min(), values.max()
    span = hi - lo
    if not torch.isfinite(span) or span <= 0:
        return torch.zeros_like(values)
    return (values - lo) / span


def normalise_similarities(similarities: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Class channels normalised together, box channels together (DESIGN §1.3): (N, Q + 4)."""
    return torch.cat(
        [minmax(similarities[:, :num_queries]), minmax(similarities[:, num_queries:])], dim=-1
    )


# ---------------------------------------------------------------------------------------------
# Maps: every patch paints its predicted box with its weight
# ---------------------------------------------------------------------------------------------

Weighting = Literal["class", "coord", "any"]
WEIGHTINGS: tuple[str, ...] = ("class", "coord", "any")
# With several queries, which class channel weighs a box: the first query's (the authors'
# class_id=[0]) or the maximum over the queries.
CLASS_QUERY_MODES: tuple[str, ...] = ("first", "max")
# Box corners to pixels: int() truncation as the authors' scripts, or floor/ceil outward.
BOX_ROUNDINGS: tuple[str, ...] = ("truncate", "outward")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def patch_weights(
    normalised: torch.Tensor,
    num_queries: int,
    weighting: str,
    query: int | str | None = "first",
) -> torch.Tensor:
    """Per-patch box weight (N,) from the normalised similarity table (N, Q + 4).

    - ``class``: the class channel of ``query``: an index, ``"first"`` (the default, the
      authors' choice: the first query) or ``"max"`` (the maximum over the query channels).
      The three agree when there is one query. ``None`` means ``"first"``.
    - ``coord``: the maximum over the four box channels ``cx, cy, w, h``.
    - ``any``: the maximum over all Q + 4 channels, i.e. ``max(class channels, coord)`` — the
      patch counts if its gradient aligns with the token's through any of its outputs (the
      authors' ``anyweight``).

    Example:
        >>> table = torch.tensor([[0.2, 0.9, 0.1, 0.0, 0.0, 0.0]])  # 2 queries + 4 box channels
        >>> patch_weights(table, 2, "class"), patch_weights(table, 2, "class", "max")
        (tensor([0.2000]), tensor([0.9000]))
    """
    if weighting == "class":
        cls = normalised[:, :num_queries]
        if query is None or query == "first":
            return cls[:, 0]
        if query == "max":
            return cls.max(-1).values
        if isinstance(query, bool) or not isinstance(query, int):
            raise ValueError(
                f"class_query: {query!r} is neither a query index nor one of "
                f"{', '.join(CLASS_QUERY_MODES)}"
            )
        return cls[:, query]
    if weighting == "coord":
        return normalised[:, num_queries:].max(-1).values
    if weighting == "any":
        return normalised.max(-1).values
    raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")


def box_pixels(
    boxes: torch.Tensor, image_size: tuple[int, int], rounding: str = "truncate"
) -> np.ndarray:
    """(N, 4) ``cx, cy, w, h`` in [0, 1] to integer pixel corners ``x0, y0, x1, y1`` (N, 4),
    x scaled by the width and y by the height (the image was squashed), clipped to the image.
    A box covers rows ``y0:y1`` and columns ``x0:x1`` (the end excluded).

    Args:
        boxes: (N, 4) boxes.
        image_size: (width, height) in pixels.
        rounding: ``"truncate"`` (default): the authors' ``int(width * (cx - w / 2))``, computed
            in float32 as their torch tensors are, truncated toward zero; ``"outward"``: floor the
            top-left and ceil the bottom-right corner in float64, so a box never loses a pixel
            it partly covers (1 px wider at right and bottom).

    Example:
        >>> b = torch.tensor([[0.5, 0.5, 0.35, 0.35]])
        >>> box_pixels(b, (10, 10)).tolist(), box_pixels(b, (10, 10), "outward").tolist()
        ([[3, 3, 6, 6]], [[3, 3, 7, 7]])
    """
    _check_choice("box_rounding", rounding, BOX_ROUNDINGS)
    width, height = image_size
    if rounding == "truncate":
        t = boxes.detach().float().cpu()  # (N, 4) float32, the dtype of the authors' boxes
        corners = [
            width * (t[:, 0] - t[:, 2] / 2),
            height * (t[:, 1] - t[:, 3] / 2),
            width * (t[:, 0] + t[:, 2] / 2),
            height * (t[:, 1] + t[:, 3] / 2),
        ]
        xyxy = torch.stack([torch.trunc(c) for c in corners], dim=1).numpy().astype(np.float64)
    else:
        b = boxes.detach().float().cpu().numpy().astype(np.float64)
        x0 = np.floor(width * (b[:, 0] - b[:, 2] / 2))
        x1 = np.ceil(width * (b[:, 0] + b[:, 2] / 2))
        y0 = np.floor(height * (b[:, 1] - b[:, 3] / 2))
        y1 = np.ceil(height * (b[:, 1] + b[:, 3] / 2))
        xyxy = np.stack([x0, y0, x1, y1], axis=1)
    xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, width)
    xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, height)
    return xyxy.astype(np.int64)


def paint_boxes(
    weights: torch.Tensor | np.ndarray, boxes_xyxy: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """Pixel-wise maximum of boxes each filled with its weight: (H, W) float32, 0 off every box.

    Painting in increasing weight order with plain assignment gives the maximum directly.
    """
    width, height = image_size
    canvas = np.zeros((height, width), dtype=np.float32)
    w = np.asarray(
        weights.detach().float().cpu() if isinstance(weights, torch.Tensor) else weights,
        dtype=np.float32,
    )
    for i in np.argsort(w, kind="stable"):
        x0, y0, x1, y1 = boxes_xyxy[i]
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = w[i]
    return canvas


def patch_grid_map(values: torch.Tensor | np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Per-patch values (N,) on the G×G grid, min–max normalised, upsampled (nearest) to the
    original (H, W): each patch covers its cell of the squashed image."""
    v = np.asarray(values.detach().float().cpu() if isinstance(values, torch.Tensor) else values)
    side = round(v.size**0.5)
    if side * side != v.size:
        raise ValueError(f"values: {v.size} patches do not form a square grid")
    v = minmax(torch.from_numpy(v.astype(np.float32))).numpy().reshape(side, side)
    width, height = image_size
    rows = np.minimum((np.arange(height) * side) // height, side - 1)
    cols = np.minimum((np.arange(width) * side) // width, side - 1)
    return v[rows][:, cols].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Answer tokens and words
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


class GAError(ValueError):
    """A GA request cannot be served; the message names the input and the problem."""


@dataclass(frozen=True)
class AnswerToken:
    """One answer token: its index in the answer, id, text piece and character span."""

    position: int
    token_id: int
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class AnswerWord:
    """A word of the answer (``[^\\W_]+`` runs, inner ``'``/``-`` kept) and its token positions."""

    text: str
    start: int
    end: int
    positions: tuple[int, ...]


def answer_tokens(
    tokenizer: Any, token_ids: Sequence[int] | torch.Tensor
) -> tuple[str, list[AnswerToken]]:
    """The decoded answer and every token's character span (by decoding growing prefixes)."""
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    tokens, previous = [], ""
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        start = len(previous) if prefix.startswith(previous) else _common_prefix(prefix, previous)
        tokens.append(AnswerToken(i, ids[i], prefix[start:], start, len(prefix)))
        previous = prefix
    return text, tokens


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def answer_words(text: str, tokens: Sequence[AnswerToken]) -> list[AnswerWord]:
    """The words of ``text`` with the positions of the tokens that overlap each."""
    words = []
    for match in _WORD.finditer(text):
        positions = tuple(
            tok.position for tok in tokens if tok.start < match.end() and tok.end > match.start()
        )
        if positions:
            words.append(AnswerWord(match.group(), match.start(), match.end(), positions))
    return words


# ---------------------------------------------------------------------------------------------
# The attribution object
# ---------------------------------------------------------------------------------------------


@dataclass
class GAResult:
    """Gradient Alignment of one explained target (a token, or a word's tokens summed).

    Attributes:
        tokens: the explained answer token(s); a multi-token word lists all of its tokens.
        target: what was asked for (the word, or ``"#<position>"``).
        queries: the Q text queries (class channels, in order).
        channels: channel names, ``queries + ["cx", "cy", "w", "h"]``.
        similarities: (N, Q + 4) cosine ``s_{k,c}``.
        normalised: (N, Q + 4) class channels min–max normalised together, box channels together.
        numerators: (N, Q + 4) ``⟨g_{k,c}, g_L⟩``; norms: (N, Q + 4) ``‖g_{k,c}‖``.
        g_llm_norm: ``‖g_L‖``.
        boxes: (N, 4) OWL-ViT boxes ``cx, cy, w, h`` in [0, 1]; boxes_xyxy: (N, 4) pixel ints.
        class_scores: (N, Q) sigmoid detection scores for the queries.
        patch_gradient_norms: (N,) per-patch ‖g_L‖ (rows of ``t`` without CLS), the
            plain-gradient baseline.
        image_size: (width, height) of the maps.
        maps: (property) weighting → (H, W) float32 map at the original image resolution, in
            [0, 1]: ``class``, ``coord``, ``any`` and ``gradient`` (the baseline painted on each
            patch's grid cell). Painted on first access.
        answer_text: the decoded answer the token(s) come from.
        class_query: which class channel the ``class`` map uses with several queries
            (``"first"``, the authors', or ``"max"``).
        box_rounding: how box corners became pixels (``"truncate"``, the authors', or
            ``"outward"``; see :func:`box_pixels`).
    """

    tokens: list[AnswerToken]
    target: str
    queries: list[str]
    similarities: torch.Tensor
    normalised: torch.Tensor
    numerators: torch.Tensor
    norms: torch.Tensor
    g_llm_norm: float
    boxes: torch.Tensor
    boxes_xyxy: np.ndarray
    class_scores: torch.Tensor
    patch_gradient_norms: torch.Tensor
    image_size: tuple[int, int]
    answer_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    class_query: str = "first"
    box_rounding: str = "truncate"
    _maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def maps(self) -> dict[str, np.ndarray]:
        for w in (*WEIGHTINGS, "gradient"):
            self.map(w)
        return self._maps

    @property
    def channels(self) -> list[str]:
        return [*self.queries, *BOX_CHANNELS]

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def weights(self, weighting: str = "class", query: int | str | None = None) -> torch.Tensor:
        """Per-patch weights (N,) of a weighting: ``class``, ``coord``, ``any`` (box weights, see
        :func:`patch_weights`; ``query`` None uses the result's ``class_query``) or ``gradient``
        (the plain-gradient baseline, min–max normalised per-patch ‖∂ logit / ∂ t‖)."""
        if weighting == "gradient":
            return minmax(self.patch_gradient_norms.float())
        chosen = self.class_query if query is None else query
        return patch_weights(self.normalised, self.num_queries, weighting, chosen)

    def map(
        self,
        weighting: str = "class",
        query: int | str | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The (H, W) map of a weighting (or ``"gradient"``, the baseline).

        The maps of the result's own settings are painted on first use and kept (only the
        weightings asked for are painted: at a camera photo's resolution each is large).

        Args:
            weighting: ``class``, ``coord``, ``any`` or ``gradient``.
            query: for ``class``: a query index, ``"first"`` or ``"max"`` (default: the
                result's ``class_query``).
            size: (width, height) to paint at instead of the image's own size, e.g. (224, 224)
                for the authors' CUB pipeline (boxes scaled to that size, then rounded).
        """
        if size is None and query is None:
            if weighting not in self._maps:
                if weighting == "gradient":
                    self._maps[weighting] = patch_grid_map(
                        self.patch_gradient_norms, self.image_size
                    )
                else:
                    self._maps[weighting] = paint_boxes(
                        self.weights(weighting), self.boxes_xyxy, self.image_size
                    )
            return self._maps[weighting]
        if weighting == "gradient":
            return patch_grid_map(self.patch_gradient_norms, size or self.image_size)
        if size is None:
            return paint_boxes(self.weights(weighting, query), self.boxes_xyxy, self.image_size)
        boxes = box_pixels(self.boxes, size, self.box_rounding)
        return paint_boxes(self.weights(weighting, query), boxes, size)


@dataclass
class _Prepared:
    """What one (image, queries) pair needs for any number of tokens."""

    t: torch.Tensor  # (1, 1 + N, D)
    image_size: tuple[int, int]
    queries: list[str]
    heads: OwlHeadGradients
    boxes: torch.Tensor
    boxes_xyxy: np.ndarray
    class_scores: torch.Tensor
    norms: torch.Tensor | None = None


class GradientAlignment:
    """GA saliency on a :class:`~jmllm.joint.JointModel` (captum-style: model in, then
    :meth:`attribute`).

    Args:
        model: a ``JointModel``.
        chunk_size: patches per batch of the norm computation (memory bound).
        progress: show a progress bar for the norm computation.
        box_rounding: box corners to pixels, ``"truncate"`` (the authors') or ``"outward"``.
        class_query: with several queries, the ``class`` map's channel: ``"first"`` (the
            authors') or ``"max"``.
        cache_size: how many (image, queries) pairs keep their OWL side (gradient norms, boxes,
            scores), least recently used dropped first. 1 suits a script that explains one image
            at a time; an interactive session that goes back and forth between images or query
            sets keeps more.

    Example:
        >>> ga = GradientAlignment(model)  # doctest: +SKIP
        >>> res = ga.attribute("bird.jpg", "What's in the image?", target="bird",
        ...                    queries=["bird"], answer="The image shows a bird")  # doctest: +SKIP
        >>> res.maps["class"].shape  # (H, W) of the original image  # doctest: +SKIP
        (375, 500)
    """

    def __init__(
        self,
        model: Any,
        chunk_size: int | None = None,
        progress: bool = False,
        *,
        box_rounding: str = "truncate",
        class_query: str = "first",
        cache_size: int = 1,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size: must be at least 1, got {cache_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.progress = progress
        self.box_rounding = _check_choice("box_rounding", box_rounding, BOX_ROUNDINGS)
        self.class_query = _check_choice("class_query", class_query, CLASS_QUERY_MODES)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, ...], _Prepared] = OrderedDict()

    # -- inputs ---------------------------------------------------------------------------------

    def embedding(self, image_or_t: Any) -> tuple[torch.Tensor, tuple[int, int], Any]:
        """``t`` (1, 1 + N, D), the map size and the JointEmbedding (None for a bare tensor).

        A bare float tensor is taken as ``t`` itself; its maps are drawn at OWL-ViT's input size.
        """
        model = self.model
        if isinstance(image_or_t, torch.Tensor) and image_or_t.is_floating_point():
            t = image_or_t if image_or_t.dim() == 3 else image_or_t.unsqueeze(0)
            size = int(model.owl.config.vision_config.image_size)
            self._check_t(t)
            return t.detach().to(model.device), (size, size), None
        emb = image_or_t if hasattr(image_or_t, "image_sizes") else model.embed(image_or_t)
        if len(emb) != 1:
            raise GAError(f"image: GA explains one image at a time, got a batch of {len(emb)}")
        self._check_t(emb.t)
        return emb.t.detach(), tuple(emb.image_sizes[0]), emb

    def _check_t(self, t: torch.Tensor) -> None:
        vision = self.model.owl.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        expected = (1, 1 + n, vision.hidden_size)
        if tuple(t.shape) != expected:
            raise GAError(f"t: expected shape {expected}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise GAError("t: contains NaN or infinite values")

    def prepare(
        self,
        t: torch.Tensor,
        image_size: tuple[int, int],
        queries: Sequence[str],
        query_template: str,
    ) -> _Prepared:
        """OWL side of one (image, queries): heads, boxes, scores; norms computed lazily, once.

        ``query_template`` is the OWL-ViT query template (``"a photo of a {}"``)."""
        key = self._cache_key(t, image_size, queries, query_template)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        names = list(key[2])
        query_embeds = self.model.encode_queries(names, query_template)
        heads = OwlHeadGradients(self.model.owl, t.to(self.model.device), query_embeds)
        outputs = heads.outputs()
        boxes = torch.sigmoid(outputs[:, heads.num_queries :])
        prepared = _Prepared(
            t=heads.t.unsqueeze(0) if heads.t.dim() == 2 else heads.t,
            image_size=image_size,
            queries=names,
            heads=heads,
            boxes=boxes,
            boxes_xyxy=box_pixels(boxes, image_size, self.box_rounding),
            class_scores=torch.sigmoid(outputs[:, : heads.num_queries]),
        )
        self._cache[key] = prepared
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return prepared

    def _cache_key(
        self,
        t: torch.Tensor,
        image_size: tuple[int, int],
        queries: Sequence[str],
        query_template: str,
    ) -> tuple[Any, ...]:
        names = self.model._check_queries(queries)
        digest = hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        return (digest, tuple(t.shape), tuple(names), query_template, tuple(image_size))

    def has_norms(
        self,
        image_or_t: Any,
        queries: Sequence[str],
        query_template: str | None = None,
    ) -> bool:
        """Whether the gradient norms of this (image, queries) are already cached, so that
        explaining a token costs one LLM backward and one JVP only.

        Args:
            image_or_t: as in :meth:`attribute` (an embedding or ``t``; an image is embedded).
            queries: the OWL-ViT queries.
            query_template: OWL-ViT query template (default J's ``"a photo of a {}"``).

        Example:
            >>> ga = GradientAlignment(model, cache_size=8)  # doctest: +SKIP
            >>> ga.has_norms(emb, ["cat"])  # doctest: +SKIP
            False
        """
        from jmllm.joint.model import DEFAULT_QUERY_TEMPLATE

        t, size, _ = self.embedding(image_or_t)
        key = self._cache_key(t, size, queries, query_template or DEFAULT_QUERY_TEMPLATE)
        cached = self._cache.get(key)
        return cached is not None and cached.norms is not None

    def clear_cache(self) -> None:
        """Forget every cached (image, queries) OWL side (its norms, boxes and scores)."""
        self._cache.clear()

    def norms(self, prepared: _Prepared) -> torch.Tensor:
        """``‖g_{k,c}‖`` of a prepared (image, queries), computed on first use only."""
        if prepared.norms is None:
            prepared.norms = prepared.heads.gradient_norms(self.chunk_size, self.progress)
        return prepared.norms

    def answer(
        self,
        emb_or_t: Any,
        t: torch.Tensor,
        prompt: str,
        answer: Any,
        max_new_tokens: int,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids (P,), answer ids (A,)): ``answer`` given (text or JointAnswer) or generated.

        The prompt is put in the conversation ``template``; a ``JointAnswer`` brings its own
        prompt ids (the template it was generated with)."""
        model = self.model
        if answer is None:
            source = emb_or_t if emb_or_t is not None else _bare_embedding(t)
            generated = model.generate(
                source, prompt, max_new_tokens=max_new_tokens, template=template
            )[0]
            return generated.prompt_ids, generated.token_ids
        if hasattr(answer, "token_ids") and hasattr(answer, "prompt_ids"):
            return answer.prompt_ids, answer.token_ids
        if not isinstance(answer, str):
            raise GAError(f"answer: expected text or a JointAnswer, got {type(answer).__name__}")
        prompt_ids = model.prompt_inputs(prompt, template)["input_ids"][0].cpu()
        ids = model.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        return prompt_ids, torch.tensor(ids, dtype=torch.long)

    # -- the token side -------------------------------------------------------------------------

    def llm_gradients(
        self,
        t: torch.Tensor,
        prompt_ids: torch.Tensor,
        answer_ids: torch.Tensor,
        positions: Sequence[Sequence[int]],
    ) -> list[torch.Tensor]:
        """``g_L`` for each group of answer positions (sum of those tokens' logits), from ONE
        teacher-forced forward over prompt + answer and one backward per group.

        Returns:
            one (1, 1 + N, D) float32 gradient per group.
        """
        model = self.model
        ids = torch.cat([prompt_ids.cpu(), answer_ids.cpu()]).unsqueeze(0).to(model.llava_device)
        P = int(prompt_ids.numel())
        t_var = t.detach().clone().requires_grad_(True)
        grads = []
        with torch.enable_grad():
            # W may run in another dtype (e.g. bf16 on GPU): the cast is part of the graph
            w_dtype = next(model.alignment.parameters()).dtype
            logits = model.language_logits(t_var.to(w_dtype), ids)  # (1, L, V)
            groups: Iterable[tuple[int, Any]] = enumerate(positions)
            if self.progress and len(positions) > 1:
                from tqdm.auto import tqdm

                # one backward per answer token: the long part of explaining a whole answer
                groups = tqdm(groups, total=len(positions), desc="GA per token", unit="token")
            for g, group in groups:
                # the logit of answer token i is predicted at sequence position P + i − 1
                rows = torch.tensor([P + i - 1 for i in group], device=logits.device)
                cols = answer_ids[list(group)].to(logits.device)
                score = logits[0, rows, cols].float().sum()
                (grad,) = torch.autograd.grad(score, t_var, retain_graph=g < len(positions) - 1)
                grads.append(grad.detach().float())
        return grads

    def _result(
        self,
        prepared: _Prepared,
        g_llm: torch.Tensor,
        numerators: torch.Tensor,
        tokens: list[AnswerToken],
        target: str,
        answer_text: str,
    ) -> GAResult:
        norms = self.norms(prepared)
        g_norm = float(torch.linalg.vector_norm(g_llm))
        sims = cosine_similarities(numerators, norms, g_norm)
        Q = len(prepared.queries)
        normalised = normalise_similarities(sims, Q)
        per_patch = torch.linalg.vector_norm(g_llm.reshape(g_llm.shape[-2:])[1:], dim=-1)
        # Results leave the model in float32 whatever its dtype (bf16 on a GPU): numpy, the
        # maps and the reports cannot take bfloat16.
        return GAResult(
            tokens=tokens,
            target=target,
            queries=list(prepared.queries),
            similarities=_f32(sims),
            normalised=_f32(normalised),
            numerators=_f32(numerators),
            norms=_f32(norms),
            g_llm_norm=g_norm,
            boxes=_f32(prepared.boxes),
            boxes_xyxy=prepared.boxes_xyxy,
            class_scores=_f32(prepared.class_scores),
            patch_gradient_norms=_f32(per_patch),
            image_size=prepared.image_size,
            answer_text=answer_text,
            class_query=self.class_query,
            box_rounding=self.box_rounding,
        )

    def attribute(
        self,
        image_or_t: Any,
        prompt: str,
        target: int | str | Sequence[int],
        queries: Sequence[str],
        answer: Any = None,
        max_new_tokens: int = 64,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        occurrence: int = 0,
        query_template: str | None = None,
    ) -> GAResult:
        """Explain one token (or word) of J's answer with Gradient Alignment.

        Args:
            image_or_t: an image (path, PIL, (3, H, W) uint8), a ``JointEmbedding``, or ``t``
                itself ((1, 1 + N, D) float; maps then drawn at OWL-ViT's input size).
            prompt: the question.
            target: an answer position (0-based, negative counts from the end) or a word of the
                answer (case-insensitive). A word of several tokens is explained through the
                **sum of the logits of all its tokens**, each at its own position.
                A list of positions is explained the same way (the sum of their logits), e.g.
                the tokens of a multi-word object name.
            queries: OWL-ViT text queries (class channels), e.g. ``["bird"]``.
            answer: the answer to explain: text (teacher-forced after the prompt), a
                ``JointAnswer``, or None to generate one greedily.
            max_new_tokens: generation limit when ``answer`` is None.
            template: the conversation template the prompt is put in, ``"llava-1.5"`` (default,
                as :meth:`JointModel.generate`) or ``"paper"`` (the authors' scripts); ignored
                for a ``JointAnswer``, which brings its prompt ids.
            occurrence: which occurrence of a repeated word (0 = first).
            query_template: OWL-ViT query template (default J's ``"a photo of a {}"``).

        Returns:
            :class:`GAResult`.

        Raises:
            GAError: empty answer, or a target not in the answer (the message lists its words).

        Example:
            >>> res = GradientAlignment(model).attribute(img, "What's in the image?", "cat",
            ...                                          ["cat"])  # doctest: +SKIP
        """
        from jmllm.joint.model import DEFAULT_QUERY_TEMPLATE

        get_template(template)  # an unknown name fails before any work
        query_template = query_template or DEFAULT_QUERY_TEMPLATE
        t, size, emb = self.embedding(image_or_t)
        prompt_ids, answer_ids = self.answer(emb, t, prompt, answer, max_new_tokens, template)
        text, tokens = answer_tokens(self.model.tokenizer, answer_ids)
        if not tokens:
            raise GAError("answer: is empty; there is no token to explain")
        positions, label = resolve_target(target, text, tokens, occurrence)
        prepared = self.prepare(t, size, queries, query_template)
        (g_llm,) = self.llm_gradients(t, prompt_ids, answer_ids, [positions])
        numerators = prepared.heads.numerators(g_llm)
        result = self._result(
            prepared, g_llm, numerators, [tokens[i] for i in positions], label, text
        )
        result.meta["template"] = _template_name(answer, template)
        return result

    def explain_answer(
        self,
        image_or_t: Any,
        prompt: str,
        queries: Sequence[str],
        answer: Any = None,
        max_new_tokens: int = 64,
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        query_template: str | None = None,
    ) -> AnswerExplanation:
        """A GA result for every answer token and every word, norms computed once.

        Cost: one generation (unless ``answer`` is given), one norm computation for the
        (image, queries), one teacher-forced LLM forward, then per token one LLM backward and
        one JVP. A word's result sums its tokens' gradients and numerators (GA is linear in
        ``g_L``), so words cost nothing more.

        Args:
            image_or_t, prompt, queries, answer, max_new_tokens, template, query_template: as
                in :meth:`attribute`.

        Returns:
            :class:`AnswerExplanation`.

        Example:
            >>> exp = GradientAlignment(model).explain_answer(img, "What's in the image?",
            ...                                               ["cat", "dog"])  # doctest: +SKIP
            >>> [w.text for w in exp.words]  # doctest: +SKIP
        """
        from jmllm.joint.model import DEFAULT_QUERY_TEMPLATE

        get_template(template)
        query_template = query_template or DEFAULT_QUERY_TEMPLATE
        t, size, emb = self.embedding(image_or_t)
        prompt_ids, answer_ids = self.answer(emb, t, prompt, answer, max_new_tokens, template)
        text, tokens = answer_tokens(self.model.tokenizer, answer_ids)
        if not tokens:
            raise GAError("answer: is empty; there is no token to explain")
        prepared = self.prepare(t, size, queries, query_template)
        grads = self.llm_gradients(t, prompt_ids, answer_ids, [[tok.position] for tok in tokens])
        numerators = [prepared.heads.numerators(g) for g in grads]
        token_results = [
            self._result(prepared, g, num, [tok], f"#{tok.position}", text)
            for g, num, tok in zip(grads, numerators, tokens, strict=True)
        ]
        words = answer_words(text, tokens)
        word_results = []
        for word in words:
            g = torch.stack([grads[i] for i in word.positions]).sum(0)
            num = torch.stack([numerators[i] for i in word.positions]).sum(0)
            word_results.append(
                self._result(prepared, g, num, [tokens[i] for i in word.positions], word.text, text)
            )
        image = emb.pil_image(0) if emb is not None and emb.images else None
        name = _template_name(answer, template)
        for result in (*token_results, *word_results):
            result.meta["template"] = name
        return AnswerExplanation(
            prompt=prompt,
            answer_text=text,
            tokens=tokens,
            words=words,
            token_results=token_results,
            word_results=word_results,
            queries=list(prepared.queries),
            image=image,
            image_size=size,
            template=name,
        )


@dataclass
class AnswerExplanation:
    """GA for a whole answer: one :class:`GAResult` per token and per word.

    Attributes:
        prompt: the question; answer_text: the decoded answer.
        tokens / token_results: every answer token and its result (same order).
        words / word_results: every word (multi-token words: summed logits) and its result.
        queries: the OWL-ViT queries; image: the RGB image (None when explained from ``t``);
        image_size: (width, height) of the maps.
        template: the conversation template of the prompt (a ``JointAnswer``'s own when one was
            explained).
    """

    prompt: str
    answer_text: str
    tokens: list[AnswerToken]
    words: list[AnswerWord]
    token_results: list[GAResult]
    word_results: list[GAResult]
    queries: list[str]
    image: Any
    image_size: tuple[int, int]
    template: str = INTERACTIVE_TEMPLATE


def _template_name(answer: Any, template: str | ConversationTemplate) -> str:
    """The name of the conversation template an explained answer's prompt was put in."""
    if hasattr(answer, "token_ids") and isinstance(getattr(answer, "template", None), str):
        return str(answer.template)
    return get_template(template).name


def resolve_target(
    target: int | str | Sequence[int],
    text: str,
    tokens: Sequence[AnswerToken],
    occurrence: int = 0,
) -> tuple[list[int], str]:
    """Answer positions of a target (position, word, or list of positions) and its label;
    GAError if absent."""
    words = answer_words(text, tokens)
    listing = ", ".join(repr(w.text) for w in words) or "(no words)"
    if isinstance(target, (list, tuple)):
        n = len(tokens)
        if not target or not all(isinstance(i, int) and not isinstance(i, bool) for i in target):
            raise GAError("target: a list of positions must be non-empty and hold only integers")
        outside = [i for i in target if not -n <= i < n]
        if outside:
            raise GAError(
                f"target: positions {outside} are outside the answer ({n} tokens, 0..{n - 1}); "
                f"its words: {listing}"
            )
        positions = sorted({i % n for i in target})
        span = text[tokens[positions[0]].start : tokens[positions[-1]].end].strip()
        return positions, span or "#" + ",".join(map(str, positions))
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise GAError(f"target: expected a position or a word, got {type(target).__name__}")
    if isinstance(target, int):
        n = len(tokens)
        if not -n <= target < n:
            raise GAError(
                f"target: position {target} is outside the answer ({n} tokens, 0..{n - 1}); "
                f"its words: {listing}"
            )
        pos = target % n
        return [pos], f"#{pos}"
    wanted = target.strip().casefold()
    matches = [w for w in words if w.text.casefold() == wanted]
    if not wanted or len(matches) <= occurrence:
        raise GAError(
            f"target: word {target!r} is not in the answer {text!r}; its words: {listing}"
        )
    return list(matches[occurrence].positions), matches[occurrence].text


def _bare_embedding(t: torch.Tensor) -> Any:
    from jmllm.joint.model import JointEmbedding

    side = round((t.shape[1] - 1) ** 0.5)
    return JointEmbedding(t=t, image_sizes=[(side, side)])


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
    "answer_tokens",
    "answer_words",
    "box_pixels",
    "cosine_similarities",
    "minmax",
    "naive_owl_gradients",
    "normalise_similarities",
    "owl_outputs_reference",
    "paint_boxes",
    "patch_grid_map",
    "patch_weights",
    "resolve_target",
]
