"""J's language-model internals for attribution methods: image-token positions, attention
weights, hidden states, the final norm and the LM head.

Every method of :mod:`jmllm.joint.saliency.attribution` that looks inside the language model goes through
the functions here — never through ``model.llava.*`` itself — so a model family whose language
model is laid out otherwise (DESIGN §10a) adapts this one module. All of them run the model
through public transformers APIs (``inputs_embeds``, ``logits_to_keep``, ``output_attentions``,
forward hooks on the decoder layers); transformers is neither patched nor vendored.

Example:
    >>> from jmllm.joint.toy import load_toy_joint
    >>> model = load_toy_joint()
    >>> ids = model.prompt_inputs("What's in the image?")["input_ids"]
    >>> image_token_positions(model, ids).shape
    torch.Size([64])
    >>> len(decoder_layers(model))
    3
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def language_model(model: Any) -> Any:
    """The decoder stack of J's language model (embeddings, layers, final norm; no LM head)."""
    return model._language().model.language_model


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The language model's decoder layers, first to last."""
    return list(language_model(model).layers)


def final_norm(model: Any) -> torch.nn.Module:
    """The norm applied to the last layer's output before the LM head."""
    norm: torch.nn.Module = language_model(model).norm
    return norm


def lm_head(model: Any) -> torch.nn.Module:
    """The language model's output projection (hidden state → vocabulary logits)."""
    head: torch.nn.Module = model._language().lm_head
    return head


def cascade_blocks(model: Any) -> list[tuple[str, list[str]]]:
    """The language model's blocks from the top, as a randomisation cascade re-initialises them
    (Adebayo et al., NeurIPS 2018): the output head with its final norm (``head``), then the
    decoder layers from the last to the first (``layer_<i>``). Paths are submodules of J's
    language model object (``get_submodule`` of :func:`language_container`).

    Example:
        >>> from jmllm.joint.toy import load_toy_joint
        >>> [name for name, _ in cascade_blocks(load_toy_joint())]
        ['head', 'layer_2', 'layer_1', 'layer_0']
    """
    blocks: list[tuple[str, list[str]]] = [("head", ["lm_head", "model.language_model.norm"])]
    blocks += [
        (f"layer_{i}", [f"model.language_model.layers.{i}"])
        for i in reversed(range(len(decoder_layers(model))))
    ]
    return blocks


def cascade_order(stages: Iterable[str]) -> list[str]:
    """Cascade stage names in cascade order — ``w``, ``head``, ``layer_<L-1>``, …, ``layer_0``,
    the last one the fully randomised model — whatever order they come in (a record read back
    from a JSON Lines file has its keys sorted: ``head``, ``layer_0``, …, ``w``).

    Example:
        >>> cascade_order(["head", "layer_0", "layer_1", "layer_10", "w"])
        ['w', 'head', 'layer_10', 'layer_1', 'layer_0']
    """

    def key(name: str) -> tuple[int, int]:
        if name == "w":
            return (0, 0)
        if name == "head":
            return (1, 0)
        if name.startswith("layer_") and name[len("layer_") :].isdigit():
            return (2, -int(name[len("layer_") :]))
        raise ValueError(f"cascade stage: {name!r} is not w, head or layer_<i>")

    return sorted(stages, key=key)


def language_container(model: Any) -> torch.nn.Module:
    """The module :func:`cascade_blocks`' paths are relative to (LLaVA itself)."""
    container: torch.nn.Module = model._language()
    return container


def initializer_std(model: Any) -> float:
    """The standard deviation a freshly initialised language model's weights are drawn with."""
    return float(getattr(model._language().config.text_config, "initializer_range", 0.02))


def image_token_positions(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Sequence positions (N,) of the image tokens W(t) fills in one row of ``input_ids``.

    Args:
        input_ids: (L,) or (1, L) ids with the prompt's N image placeholders.

    Returns:
        (N,) long tensor, the placeholder positions in order (patch k of ``t``'s grid, row-major,
        is position ``[k]``).
    """
    ids = input_ids.reshape(-1)
    positions = (ids == model.llava.config.image_token_id).nonzero().flatten()
    n = model.num_image_tokens
    if positions.numel() < n:
        raise ValueError(f"input_ids: {positions.numel()} image tokens, J fills {n}")
    return positions[:n].cpu()


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run the language model with eager attention inside the block, so attention weights can
    be returned (SDPA and flash kernels do not return them); the previous implementation is put
    back after."""
    llava = model._language()
    before = getattr(llava.config, "_attn_implementation", None)
    if before == "eager" or before is None:
        yield
        return
    llava.set_attn_implementation("eager")
    try:
        yield
    finally:
        llava.set_attn_implementation(before)


@dataclass
class LanguageInternals:
    """What one forward of J's language model exposes.

    Attributes:
        logits: (B, R, V) float32 logits at the requested rows (all rows when none were asked).
        attentions: per layer (B, H, L, L) attention weights (float32), or None.
        hidden_states: the residual stream before the final norm, (B, L, D) float32 each:
            ``[0]`` the input embeddings, ``[i]`` the output of decoder layer ``i - 1``; or None.
    """

    logits: torch.Tensor
    attentions: list[torch.Tensor] | None = None
    hidden_states: list[torch.Tensor] | None = None


def run_language_model(
    model: Any,
    t: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    rows: torch.Tensor | Sequence[int] | None = None,
    attentions: bool = False,
    hidden_states: bool = False,
) -> LanguageInternals:
    """One teacher-forced forward of J's language model on ``W(t)``, differentiable in ``t``.

    Args:
        t: (B, 1 + N, D_owl) embeddings (B rows of the same prompt, e.g. perturbed copies).
        input_ids: (1, L) or (B, L) ids of prompt + answer, no padding.
        rows: sequence positions whose logits are wanted (``logits_to_keep``: the LM head runs
            on these rows only, which is what makes a batch of perturbed copies cheap); None:
            every row.
        attentions: also return every layer's attention weights (eager attention).
        hidden_states: also return the residual stream after every layer (before the final
            norm).

    Returns:
        :class:`LanguageInternals`.
    """
    llava = model._language()
    B = t.shape[0]
    ids = input_ids.to(model.llava_device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[0] == 1 and B > 1:
        ids = ids.expand(B, -1)
    w_dtype = next(model.alignment.parameters()).dtype
    inputs_embeds = model.merge_image_tokens(ids, model.image_tokens(t.to(w_dtype)))
    kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds, "use_cache": False}
    if rows is not None:
        keep = torch.as_tensor(rows, dtype=torch.long, device=inputs_embeds.device)
        kwargs["logits_to_keep"] = keep
    captured: list[torch.Tensor] = []
    handles = []
    if hidden_states:

        def keep_output(_module: Any, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep_output) for layer in decoder_layers(model)]
    try:
        with eager_attention(model) if attentions else contextlib.nullcontext():
            out = llava(**kwargs, output_attentions=attentions)
    finally:
        for handle in handles:
            handle.remove()
    return LanguageInternals(
        logits=out.logits.float(),
        attentions=[a.float() for a in out.attentions] if attentions else None,
        hidden_states=[inputs_embeds.float(), *(h.float() for h in captured)]
        if hidden_states
        else None,
    )


__all__ = [
    "LanguageInternals",
    "cascade_blocks",
    "cascade_order",
    "decoder_layers",
    "eager_attention",
    "final_norm",
    "image_token_positions",
    "initializer_std",
    "language_container",
    "language_model",
    "lm_head",
    "run_language_model",
]
