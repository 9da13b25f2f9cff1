"""Per answer: which objects J names, whether OWL-ViT sees them, and the GA evidence for each."""

from jmllm.joint.hallucination.check import (
    COCO_OBJECTS,
    ForcedAnswer,
    HallucinationReport,
    MentionedObject,
    ObjectCheck,
    check_hallucinations,
    object_mentions,
)
from jmllm.joint.hallucination.page import (
    detections_picture,
    render_hallucination_report,
    write_hallucination_report,
)

__all__ = [
    "COCO_OBJECTS",
    "ForcedAnswer",
    "HallucinationReport",
    "MentionedObject",
    "ObjectCheck",
    "check_hallucinations",
    "detections_picture",
    "object_mentions",
    "render_hallucination_report",
    "write_hallucination_report",
]
