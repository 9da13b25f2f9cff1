"""Tiny offline J for tests: checkpoints of every family built in-process and loaded back.

Before 0.2 ``jmllm.joint.testing`` was one module, now :mod:`jmllm.joint.testing.checkpoints`; what
it held is importable from here as before.
"""

from jmllm.joint.compat import forward_to
from jmllm.joint.testing import checkpoints as _checkpoints
from jmllm.joint.testing.checkpoints import (
    COCO_FIXTURE_CLASSES,
    PUBLISHED,
    TINY_FAMILIES,
    TinyJoint,
    build_tiny_family,
    build_tiny_family_joint,
    build_tiny_joint,
    build_tiny_owlv2_joint,
    generated_images,
    key_fields,
    published_config,
    published_tokenizer,
    real_shape_joint,
    record_prompts,
    tiny_family_joint_model,
    tiny_joint_model,
    write_coco_folder,
    write_image_folder,
)

__all__ = [
    "COCO_FIXTURE_CLASSES",
    "PUBLISHED",
    "TINY_FAMILIES",
    "TinyJoint",
    "build_tiny_family",
    "build_tiny_family_joint",
    "build_tiny_joint",
    "build_tiny_owlv2_joint",
    "generated_images",
    "key_fields",
    "published_config",
    "published_tokenizer",
    "real_shape_joint",
    "record_prompts",
    "tiny_family_joint_model",
    "tiny_joint_model",
    "write_coco_folder",
    "write_image_folder",
]

__getattr__ = forward_to(_checkpoints, __name__)
