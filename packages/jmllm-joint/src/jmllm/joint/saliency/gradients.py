"""The gradient math of GA: O^OWL as a function of ``t``, its gradients, their similarities to a token's.

The exact, fast computation (forward-mode products per patch, one backward pass per output
channel) beside the naive reference (one ``torch.autograd.grad`` per output), and the
normalisations the authors apply to the cosine similarities. See :mod:`jmllm.joint.saliency`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.func import jvp, vjp

from jmllm.align.features import owl_base_model

BOX_CHANNELS = ("cx", "cy", "w", "h")
OBJECTNESS_CHANNEL = "objectness"
"""OWLv2's class-query-independent channel, after the box channels (OWL-ViT has none)."""


def has_objectness(owl: Any) -> bool:
    """Whether an OWL detector has an objectness head (OWLv2 does, OWL-ViT does not).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> has_objectness(NS()), has_objectness(NS(objectness_head=object()))
        (False, True)
    """
    return getattr(owl, "objectness_head", None) is not None


# ---------------------------------------------------------------------------------------------
# O^OWL as a function of t
# ---------------------------------------------------------------------------------------------


def _vision(owl: Any) -> Any:
    return owl_base_model(owl).vision_model


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
    features ``feats`` (..., D): (..., Q + 4), then OWLv2's objectness logit (..., Q + 5). Uses
    the heads' own modules."""
    head = owl.class_head
    image_class = head.dense0(feats)  # (..., D_q)
    image_class = image_class / (torch.linalg.norm(image_class, dim=-1, keepdim=True) + 1e-6)
    q = queries / (torch.linalg.norm(queries, dim=-1, keepdim=True) + 1e-6)  # (Q, D_q)
    logits = image_class @ q.T  # (..., Q)
    shift = head.logit_shift(feats)  # (..., 1)
    scale = head.elu(head.logit_scale(feats)) + 1
    class_logits = (logits + shift) * scale
    box_logits = owl.box_head(feats)  # (..., 4)
    if has_objectness(owl):
        return torch.cat([class_logits, box_logits, owl.objectness_head(feats)], dim=-1)
    return torch.cat([class_logits, box_logits], dim=-1)


def owl_outputs_reference(owl: Any, t: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
    """O^OWL of ``t`` through the modules' own forward methods: (N, Q + 4).

    The last encoder layer is called as a module (whatever attention implementation the model
    was loaded with), then post-layernorm, the CLS merge, the layer norm, the class head and the
    box head, exactly as ``OwlViTForObjectDetection`` chains them. Box channels are the box head's
    logits plus the grid bias, *before* the sigmoid (``sigmoid`` of them are the boxes).

    Args:
        owl: an ``OwlViTForObjectDetection`` or ``Owlv2ForObjectDetection``.
        t: (1, 1 + N, D) penultimate hidden state, CLS first.
        query_embeds: (Q, D_q) text-query embeddings.

    Returns:
        (N, Q + 4): class logits, then ``cx, cy, w, h`` logits; OWLv2: (N, Q + 5), its
        objectness logit last (the head module itself, not the stock predictor, which detaches
        its input).
    """
    vision = _vision(owl)
    hidden = vision.encoder.layers[-1](t, attention_mask=None)  # (1, 1 + N, D)
    image_embeds = vision.post_layernorm(hidden)
    merged = image_embeds[:, 1:, :] * image_embeds[:, :1, :]  # (1, N, D)
    feats = owl.layer_norm(merged)
    queries = query_embeds if query_embeds.dim() == 3 else query_embeds.unsqueeze(0)
    class_logits, _ = owl.class_head(feats, queries.to(feats.dtype), None)  # (1, N, Q)
    box_logits = owl.box_head(feats) + owl.box_bias.to(feats)  # (1, N, 4)
    extra = [owl.objectness_head(feats)] if has_objectness(owl) else []  # (1, N, 1)
    return torch.cat([class_logits, box_logits, *extra], dim=-1)[0]


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
        self.objectness = has_objectness(owl)
        if self.box_bias.shape[0] != self.num_patches:
            raise ValueError(
                f"t has {self.num_patches} patch tokens but OWL-ViT's grid has "
                f"{self.box_bias.shape[0]}"
            )

    @property
    def num_channels(self) -> int:
        """C = Q + 4 outputs per patch (Q + 5 with OWLv2's objectness)."""
        return self.num_queries + 4 + int(self.objectness)

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
        bias = [torch.zeros(self.num_patches, self.num_queries).to(self.box_bias), self.box_bias]
        if self.objectness:
            bias.append(torch.zeros(self.num_patches, 1).to(self.box_bias))
        return _heads_from_features(self.owl, feats, self.queries) + torch.cat(bias, dim=-1)

    def outputs(self) -> torch.Tensor:
        """O^OWL(t): (N, Q + 4) class logits, then pre-sigmoid ``cx, cy, w, h`` (OWLv2: then its
        objectness logit)."""
        with torch.no_grad():
            return self._outputs_of(self.t[0])

    def boxes(self) -> torch.Tensor:
        """The predicted boxes (N, 4) ``cx, cy, w, h`` in [0, 1] of the model's square input."""
        Q = self.num_queries
        return torch.sigmoid(self.outputs()[:, Q : Q + 4])

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
    """Class channels normalised together, box channels together (DESIGN §1.3): (N, Q + 4);
    OWLv2's objectness channel, if present (N, Q + 5), on its own."""
    Q = num_queries
    parts = [minmax(similarities[:, :Q]), minmax(similarities[:, Q : Q + 4])]
    if similarities.shape[1] > Q + 4:
        parts.append(minmax(similarities[:, Q + 4 :]))
    return torch.cat(parts, dim=-1)
