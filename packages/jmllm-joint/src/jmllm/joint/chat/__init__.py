"""Conversations with J: the prompt templates and LLaVA's tokenization by name.

Before 0.2 ``jmllm.joint.chat`` was one module, now :mod:`jmllm.joint.chat.templates`; what it held
is importable from here as before.
"""

from jmllm.joint.chat import templates as _templates
from jmllm.joint.chat.templates import (
    AUTHORS_REPLY_MARK,
    CONVERSATION_TEMPLATES,
    DEFAULT_EOS,
    IMAGE_PLACEHOLDER,
    INTERACTIVE_MAX_NEW_TOKENS,
    INTERACTIVE_TEMPLATE,
    LLAVA_TEMPLATES,
    PAPER_TEMPLATE,
    ChatTurn,
    Conversation,
    ConversationTemplate,
    JointAnswer,
    PromptError,
    authors_reply,
    check_question,
    format_conversation,
    format_prompt,
    get_template,
)
from jmllm.joint.compat import forward_to

__all__ = [
    "AUTHORS_REPLY_MARK",
    "CONVERSATION_TEMPLATES",
    "DEFAULT_EOS",
    "IMAGE_PLACEHOLDER",
    "INTERACTIVE_MAX_NEW_TOKENS",
    "INTERACTIVE_TEMPLATE",
    "LLAVA_TEMPLATES",
    "PAPER_TEMPLATE",
    "ChatTurn",
    "Conversation",
    "ConversationTemplate",
    "JointAnswer",
    "PromptError",
    "authors_reply",
    "check_question",
    "format_conversation",
    "format_prompt",
    "get_template",
]

__getattr__ = forward_to(_templates, __name__)
