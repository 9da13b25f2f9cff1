"""What J needs of a multi-modal LLM family: its vision tokens, how W(t) takes their place, the
extra inputs its forward and ``generate`` need, and its conversation template.

A family is one subclass of :class:`FamilyAdapter` in ``jmllm/joint/families/<model_type>.py``,
named after transformers' ``model_type``. The vision side (token grids, the model's own vision
tokens) comes from :mod:`jmllm.align.families`, which W's trainer shares; this class adds what
the language model needs:

- :meth:`FamilyAdapter.pack`: W's tokens (one per grid cell of every block) into the sequence the
  language model reads (LLaVA-1.5 and Qwen: as they are; LLaVA-NeXT/OneVision: the model's own
  ``pack_image_features``, with its newline tokens);
- :meth:`FamilyAdapter.image_text`: what replaces ``<image>`` in the prompt text;
- :meth:`FamilyAdapter.forward_inputs` and :meth:`FamilyAdapter.generate_inputs`: positions
  (left padding; Qwen's M-RoPE through ``get_rope_index``) and grids (``image_grid_thw``);
- :attr:`FamilyAdapter.template`: the chat format of the family's checkpoints.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jmllm.align.families import VisionFamily, VisionLayout


class FamilyAdapter:
    """J's view of one MLLM family (subclass per ``model_type``).

    Args:
        mllm: the loaded ``...ForConditionalGeneration`` model.

    Example:
        >>> from jmllm.joint.model.families import adapter_for
        >>> adapter = adapter_for(model.mllm)  # doctest: +SKIP
        >>> adapter.num_tokens  # LLaVA-1.5: 576 image tokens  # doctest: +SKIP
        576
    """

    model_type: ClassVar[str] = ""
    vision_class: ClassVar[type[VisionFamily]] = VisionFamily
    # the conversation template J prompts this family with when the caller names a LLaVA-1.5
    # template (``llava-1.5``, ``paper``): the chat format the family's checkpoints were tuned on
    template: ClassVar[str] = "llava-1.5"
    # True: ``generate`` takes the prompt's ids beside its embeddings and returns them first
    generate_with_ids: ClassVar[bool] = False

    def __init__(self, mllm: Any) -> None:
        self.mllm = mllm
        self.config = mllm.config
        self.vision = self.vision_class(self.config)

    # -- the vision tokens ---------------------------------------------------------------------
    @property
    def layout(self) -> VisionLayout:
        """The grids W fills (and the family's own vision reads), from the config."""
        return self.vision.layout

    @property
    def num_tokens(self) -> int:
        """Image tokens per image in the prompt, after :meth:`pack`."""
        return self.layout.num_tokens

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def image_text(self, tokenizer: Any) -> str:
        """The prompt text that stands for one image: the image token, once per image token."""
        return str(tokenizer.convert_ids_to_tokens(self.image_token_id)) * self.num_tokens

    def pack(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens of every block → (B, L, D), the sequence the language model reads
        in place of the image placeholders; differentiable."""
        return tokens

    def stock_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own vision tokens of every block for (B, 3, S, S) normalised squares."""
        return self.vision.tokens(self.mllm, pixel_values)

    # -- the language model's inputs -----------------------------------------------------------
    def forward_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        placeholders: torch.Tensor,
    ) -> dict[str, Any]:
        """Extra keyword arguments of a forward over ``inputs_embeds`` (no cache) for (B, L)
        ``input_ids`` whose ``placeholders`` (B, L) bool took the image tokens.

        The default: with left padding, positions count real tokens only, as ``generate`` does.
        """
        if attention_mask is not None and bool((attention_mask == 0).any()):
            return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}
        return {}

    def generate_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, placeholders: torch.Tensor
    ) -> dict[str, Any]:
        """Extra keyword arguments of ``generate`` over ``inputs_embeds`` (default none)."""
        return {}

    def prefill_inputs(self, input_ids: torch.Tensor, placeholders: torch.Tensor) -> dict[str, Any]:
        """Extra keyword arguments of a cached forward over a prompt's unpadded prefix, after
        which ``generate`` continues from the cache (the hallucination audit)."""
        return {}
