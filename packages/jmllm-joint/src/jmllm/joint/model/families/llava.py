"""LLaVA-1.5 (``model_type`` ``llava``): J as the paper built it.

576 image tokens (CLIP ViT-L/14-336's 24×24 grid, CLS dropped) take the place of the ``<image>``
placeholder; W(t) fills them one to one from OWL-ViT B/32's 24×24 grid, with no resampling. No
extra inputs (positions from the attention mask under left padding). Templates: ``llava-1.5``
(the model card's) and ``paper`` (the authors' scripts), by name.
"""

from __future__ import annotations

from typing import ClassVar

from jmllm.align.families import LlavaVision
from jmllm.joint.model.families.base import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5: W(t) replaces the image tokens one to one."""

    model_type: ClassVar[str] = "llava"
    vision_class = LlavaVision
    template: ClassVar[str] = "llava-1.5"
