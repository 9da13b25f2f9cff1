"""LLaVA-OneVision (``model_type`` ``llava_onevision``): LLaVA-NeXT's any-res layout on SigLIP.

The square J shows it is the smallest square grid pinpoint above the tower's 384 px (768 px:
the 27×27 base grid and 2×2 crops of 27×27); OWL-ViT's 24×24 ``t`` is resampled onto every grid.
The model's own ``pack_image_features`` (with its ``anyres_max_9`` pooling rule, which leaves a
2×2 layout as it is, and its newline tokens) gives 729 + 54 × 55 = 3699 image tokens.
Template: ``llava-onevision`` (ChatML, as the llava-hf checkpoints' chat template).
"""

from __future__ import annotations

from typing import Any, ClassVar

from jmllm.align.families import LlavaOnevisionVision
from jmllm.joint.model.families.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's layout; the model's own packing (``vision_aspect_ratio``)."""

    model_type: ClassVar[str] = "llava_onevision"
    vision_class = LlavaOnevisionVision

    @property
    def template(self) -> str:  # type: ignore[override]
        return "llava-onevision"

    def _pack_features(self, features: list[Any], sizes: Any, newline: Any) -> Any:
        packed, _ = self.mllm.model.pack_image_features(
            features,
            sizes,
            image_newline=newline,
            vision_aspect_ratio=getattr(self.config, "vision_aspect_ratio", "anyres_max_9"),
        )
        return packed
