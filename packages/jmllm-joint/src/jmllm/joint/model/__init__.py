"""The joint model J: its loading, its embedding path and its generation, and the MLLM family adapters.

Before 0.2 ``jmllm.joint.model`` was one module, now :mod:`jmllm.joint.model.joint`; what it held
is importable from here as before.
"""

from jmllm.joint.compat import forward_to
from jmllm.joint.model import joint as _joint
from jmllm.joint.model.joint import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_LLAVA,
    DEFAULT_MLLM,
    DEFAULT_OWL,
    DEFAULT_QUERY_TEMPLATE,
    DTYPES,
    MAX_IMAGE_SIDE,
    QUERY_CACHE_SIZE,
    ImageInput,
    JointEmbedding,
    JointModel,
    JointModelError,
    Vision,
    as_dtype,
    check_compatible,
    check_local_source,
    logger,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_LLAVA",
    "DEFAULT_MLLM",
    "DEFAULT_OWL",
    "DEFAULT_QUERY_TEMPLATE",
    "DTYPES",
    "MAX_IMAGE_SIDE",
    "QUERY_CACHE_SIZE",
    "ImageInput",
    "JointEmbedding",
    "JointModel",
    "JointModelError",
    "Vision",
    "as_dtype",
    "check_compatible",
    "check_local_source",
    "logger",
]

__getattr__ = forward_to(_joint, __name__)
