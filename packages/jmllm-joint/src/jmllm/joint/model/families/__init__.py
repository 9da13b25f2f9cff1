"""The MLLM families J supports, one module each, named after transformers' ``model_type``.

:func:`adapter_for` picks the family of a loaded model from its config; an unsupported one is
refused in one line listing :data:`FAMILIES`. Adding a family: a module here with a
:class:`~jmllm.joint.model.families.base.FamilyAdapter` subclass, its vision side in
:mod:`jmllm.align.families`, an entry in :data:`FAMILIES` (``docs/architecture.md``).

Example:
    >>> sorted(FAMILIES)
    ['llava', 'llava_next', 'llava_onevision', 'qwen2_5_vl', 'qwen2_vl']
"""

from __future__ import annotations

from typing import Any

from jmllm.align.families import UnsupportedFamilyError, family_name
from jmllm.joint.model.families.base import FamilyAdapter
from jmllm.joint.model.families.llava import LlavaAdapter
from jmllm.joint.model.families.llava_next import LlavaNextAdapter
from jmllm.joint.model.families.llava_onevision import LlavaOnevisionAdapter
from jmllm.joint.model.families.qwen2_5_vl import Qwen25VLAdapter
from jmllm.joint.model.families.qwen2_vl import Qwen2VLAdapter

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "UnsupportedFamilyError",
    "adapter_for",
]

FAMILIES: dict[str, type[FamilyAdapter]] = {
    cls.model_type: cls
    for cls in (
        LlavaAdapter,
        LlavaNextAdapter,
        LlavaOnevisionAdapter,
        Qwen2VLAdapter,
        Qwen25VLAdapter,
    )
}


def adapter_for(mllm: Any) -> FamilyAdapter:
    """The :class:`FamilyAdapter` of a loaded MLLM, chosen by its config's ``model_type``.

    Raises:
        UnsupportedFamilyError: one line naming the model type and the supported families.
    """
    return FAMILIES[family_name(mllm.config)](mllm)
