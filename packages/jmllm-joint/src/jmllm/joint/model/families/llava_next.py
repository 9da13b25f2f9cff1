"""LLaVA-NeXT / LLaVA-1.6 (``model_type`` ``llava_next``): the any-res layout, filled from ``t``.

J shows LLaVA-NeXT the whole image squashed to the smallest square grid pinpoint above its
tower's input (672 px for ``llava-hf/llava-v1.6-*``): the base grid of the whole image (24×24)
and a 2×2 grid of crops, each 24×24 tokens over a quarter of the image. W(t) fills every one:
the base from ``t``'s grid as it is (OWL-ViT B/32 is 24×24), each crop from ``t``'s quarter
resampled to 24×24 (bilinear; the crops get no detail beyond ``t``'s). The model's own
``pack_image_features`` then lays them out as the stock model does (crops side by side, a newline
token after every row): 576 + 48 × 49 = 2928 image tokens.

Template: the chat format of the checkpoint's language model (``llava-next-mistral`` for
Mistral, ``llava-next-vicuna`` for Vicuna/Llama, ``llava-onevision`` (ChatML) for Qwen2).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from jmllm.align.families import LlavaNextVision
from jmllm.joint.model.families.base import FamilyAdapter

# chat format per language model type (the llava-hf checkpoints' chat templates)
TEMPLATES_BY_TEXT_MODEL = {
    "mistral": "llava-next-mistral",
    "llama": "llava-next-vicuna",
    "qwen2": "llava-onevision",
}


class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT: base grid + 2×2 crops, packed by the model's own ``pack_image_features``."""

    model_type: ClassVar[str] = "llava_next"
    vision_class = LlavaNextVision

    @property
    def template(self) -> str:  # type: ignore[override]
        text = str(getattr(self.config.text_config, "model_type", ""))
        return TEMPLATES_BY_TEXT_MODEL.get(text, "llava-next-mistral")

    @property
    def vision_next(self) -> LlavaNextVision:
        assert isinstance(self.vision, LlavaNextVision)
        return self.vision

    @property
    def num_tokens(self) -> int:
        # packed once on 1-wide zeros: the model's own unpadding/newline rules decide the count
        blocks = torch.zeros(1, self.layout.num_tokens, 1)
        return int(self._pack(blocks, torch.zeros(1)).shape[1])

    def pack(self, tokens: torch.Tensor) -> torch.Tensor:
        newline = self.mllm.model.image_newline
        return self._pack(tokens, newline.to(device=tokens.device, dtype=tokens.dtype))

    def _pack(self, tokens: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        blocks = len(self.layout.blocks)
        per_block = tokens.reshape(B, blocks, N // blocks, D)  # (B, 1 + k², g², D)
        side = self.layout.side
        sizes = torch.tensor([[side, side]] * B, device=tokens.device)
        packed = self._pack_features(list(per_block), sizes, newline)
        return torch.stack(packed)  # (B, L, D): every image has the same layout

    def _pack_features(self, features: list[torch.Tensor], sizes: Any, newline: Any) -> Any:
        packed, _ = self.mllm.model.pack_image_features(
            features,
            sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=newline,
        )
        return packed
