"""Qwen2.5-VL (``model_type`` ``qwen2_5_vl``): Qwen2-VL's layout, positions and template.

The tower differs (window attention, an RMSNorm/SwiGLU ViT) but not what J sees of it: the image
at 672 px, 24×24 merged tokens filled one to one by W(t), M-RoPE from ``get_rope_index``.
"""

from __future__ import annotations

from typing import ClassVar

from jmllm.align.families import Qwen25VLVision
from jmllm.joint.model.families.qwen2_vl import Qwen2VLAdapter


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL."""

    model_type: ClassVar[str] = "qwen2_5_vl"
    vision_class = Qwen25VLVision
