"""O^OWL: OWL-ViT's detection heads on the shared embedding t, and their decoding."""

from jmllm.joint.detection.heads import (
    DEFAULT_NMS_IOU,
    DEFAULT_THRESHOLD,
    Detections,
    batched_nms,
    box_iou,
    cxcywh_to_xyxy,
    decode_detections,
    nms,
    owl_detection_heads,
)

__all__ = [
    "DEFAULT_NMS_IOU",
    "DEFAULT_THRESHOLD",
    "Detections",
    "batched_nms",
    "box_iou",
    "cxcywh_to_xyxy",
    "decode_detections",
    "nms",
    "owl_detection_heads",
]
