"""O^OWL: OWL-ViT's detection heads on the shared embedding t, and their decoding.

Before 0.2 ``jmllm.joint.detection`` was one module, now :mod:`jmllm.joint.detection.heads`; what
it held is importable from here as before.
"""

from jmllm.joint.compat import forward_to
from jmllm.joint.detection import heads as _heads
from jmllm.joint.detection.heads import (
    DEFAULT_NMS_IOU,
    DEFAULT_THRESHOLD,
    Detections,
    HeadOutputs,
    batched_nms,
    box_iou,
    cxcywh_to_xyxy,
    decode_detections,
    image_fraction_boxes,
    nms,
    owl_detection_heads,
    owl_head_outputs,
    pads_to_square,
)

__all__ = [
    "DEFAULT_NMS_IOU",
    "DEFAULT_THRESHOLD",
    "Detections",
    "HeadOutputs",
    "batched_nms",
    "box_iou",
    "cxcywh_to_xyxy",
    "decode_detections",
    "image_fraction_boxes",
    "nms",
    "owl_detection_heads",
    "owl_head_outputs",
    "pads_to_square",
]

__getattr__ = forward_to(_heads, __name__)
