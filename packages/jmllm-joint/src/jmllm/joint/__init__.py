"""jmllm-joint: the joint model J of Giulivi and Boracchi (2024).

One OWL-ViT vision embedding ``t`` feeds LLaVA-1.5 through the alignment layer W *and* OWL-ViT's
detection heads, so every answer comes with the detections it was made from.

Example:
    >>> from jmllm.joint import JointModel
    >>> model = JointModel.from_pretrained(alignment="w.safetensors")  # doctest: +SKIP
    >>> emb = model.embed(["cat.jpg"])  # doctest: +SKIP
    >>> model.generate(emb, "What's in the image?")[0].text  # doctest: +SKIP
"""

from jmllm.joint import compat  # noqa: F401  (old import paths keep working, with a warning)
from jmllm.joint.chat import (
    CONVERSATION_TEMPLATES,
    ChatTurn,
    Conversation,
    ConversationTemplate,
    PromptError,
    format_conversation,
    format_prompt,
    get_template,
)
from jmllm.joint.detection import Detections, decode_detections, nms
from jmllm.joint.model import (
    DEFAULT_LLAVA,
    DEFAULT_OWL,
    DEFAULT_QUERY_TEMPLATE,
    JointAnswer,
    JointEmbedding,
    JointModel,
    JointModelError,
    check_compatible,
)
from jmllm.joint.render.explanation import explain_object, object_explanation, object_picture
from jmllm.joint.saliency import AnswerExplanation, GAError, GAResult, GradientAlignment
from jmllm.joint.wsol import max_box_acc_v2, run_wsol

__version__ = "0.1.0"

__all__ = [
    "CONVERSATION_TEMPLATES",
    "DEFAULT_LLAVA",
    "DEFAULT_OWL",
    "DEFAULT_QUERY_TEMPLATE",
    "AnswerExplanation",
    "ChatTurn",
    "Conversation",
    "ConversationTemplate",
    "Detections",
    "GAError",
    "GAResult",
    "GradientAlignment",
    "JointAnswer",
    "JointEmbedding",
    "JointModel",
    "JointModelError",
    "PromptError",
    "check_compatible",
    "decode_detections",
    "explain_object",
    "format_conversation",
    "format_prompt",
    "get_template",
    "max_box_acc_v2",
    "nms",
    "object_explanation",
    "object_picture",
    "run_wsol",
]
