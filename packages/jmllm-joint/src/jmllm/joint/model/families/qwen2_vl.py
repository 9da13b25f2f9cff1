"""Qwen2-VL (``model_type`` ``qwen2_vl``): dynamic resolution at a fixed square, M-RoPE positions.

J shows Qwen2-VL the whole image squashed to 672 px: 48×48 patches of 14 px, merged 2×2 into
24×24 = 576 tokens, the grid of OWL-ViT B/32, so W(t) fills them one to one. The image stands in
the prompt as ``<|vision_start|>`` + 576 × ``<|image_pad|>`` + ``<|vision_end|>``. The language
model's 3-D rotary positions (M-RoPE) come from the model's own ``get_rope_index``, given the
image tokens (``mm_token_type_ids``) and the patch grid (``image_grid_thw`` = 1 × 48 × 48).
Template: ``qwen2-vl`` (ChatML with the default system prompt, as the checkpoints' chat
template).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jmllm.align.families import Qwen2VLVision
from jmllm.joint.model.families.base import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL: the merged 24×24 token grid, M-RoPE from ``get_rope_index``."""

    model_type: ClassVar[str] = "qwen2_vl"
    vision_class = Qwen2VLVision
    template: ClassVar[str] = "qwen2-vl"
    generate_with_ids: ClassVar[bool] = True

    def image_text(self, tokenizer: Any) -> str:
        start, end = self.config.vision_start_token_id, self.config.vision_end_token_id
        pad = str(tokenizer.convert_ids_to_tokens(self.image_token_id))
        return (
            str(tokenizer.convert_ids_to_tokens(start))
            + pad * self.num_tokens
            + str(tokenizer.convert_ids_to_tokens(end))
        )

    def grid_thw(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, 3) ``image_grid_thw``: one temporal step, the patch grid before the 2×2 merge."""
        rows, cols = self.layout.grid
        merge = int(self.config.vision_config.spatial_merge_size)
        return torch.tensor([[1, rows * merge, cols * merge]] * batch, device=device)

    def _mrope(self, input_ids: torch.Tensor, placeholders: torch.Tensor) -> dict[str, Any]:
        # The model computes M-RoPE itself from the ids, the image tokens and the grid (and keeps
        # the offset for later cached steps): only the placeholders count as image tokens, so
        # an image-token id the model generated is text, as it was during generation.
        return {
            "input_ids": input_ids,
            "mm_token_type_ids": placeholders.to(torch.int32),
            "image_grid_thw": self.grid_thw(input_ids.shape[0], input_ids.device),
        }

    def forward_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        placeholders: torch.Tensor,
    ) -> dict[str, Any]:
        return self._mrope(input_ids, placeholders)

    def generate_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, placeholders: torch.Tensor
    ) -> dict[str, Any]:
        return self._mrope(input_ids, placeholders)

    def prefill_inputs(self, input_ids: torch.Tensor, placeholders: torch.Tensor) -> dict[str, Any]:
        return self._mrope(input_ids, placeholders)
