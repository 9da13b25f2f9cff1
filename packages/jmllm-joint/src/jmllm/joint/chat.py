"""LLaVA-1.5 prompt templates and multi-turn conversations.

LLaVA-1.5 (``llava-hf/llava-1.5-*-hf``) was trained with the Vicuna-v1 conversation format:
roles ``USER``/``ASSISTANT`` separated by a space, every finished assistant turn closed by the
end-of-sequence token ``</s>``, and the image placeholder only in the first user turn::

    USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:

The placeholder is later expanded to one image token per vision patch (576 for LLaVA-1.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jmllm.joint.model import JointAnswer

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_EOS = "</s>"


class PromptError(ValueError):
    """A prompt or conversation cannot be used; the message names it and says why."""


def check_question(question: object, name: str = "prompt") -> str:
    """Validate one user question: a non-empty string without the image placeholder."""
    if not isinstance(question, str):
        raise PromptError(f"{name}: expected a string, got {type(question).__name__}")
    if not question.strip():
        raise PromptError(f"{name}: empty prompt")
    if IMAGE_PLACEHOLDER in question:
        raise PromptError(
            f"{name}: must not contain the image placeholder {IMAGE_PLACEHOLDER!r} "
            "(the template adds it once, in the first turn)"
        )
    return question.strip()


@dataclass(frozen=True)
class ChatTurn:
    """One exchange: the user's question and, once generated, the assistant's answer."""

    question: str
    answer: str | None = None  # None: the turn the model answers next
    result: JointAnswer | None = None  # the generation that produced ``answer``, when known


@dataclass(frozen=True)
class Conversation:
    """A multi-turn conversation about one image (the image belongs to the first turn).

    Example:
        >>> conv = Conversation().ask("What's in the image?")
        >>> format_conversation(conv)
        "USER: <image>\\nWhat's in the image? ASSISTANT:"
        >>> conv = conv.answered("A cat.").ask("What colour is it?")
        >>> format_conversation(conv)
        "USER: <image>\\nWhat's in the image? ASSISTANT: A cat.</s>USER: What colour is it? ASSISTANT:"
    """

    turns: tuple[ChatTurn, ...] = field(default_factory=tuple)

    def ask(self, question: str) -> Conversation:
        """A new conversation with ``question`` appended as the next, unanswered turn."""
        if self.turns and self.turns[-1].answer is None:
            raise PromptError("conversation: the last question has no answer yet")
        question = check_question(question, f"turn {len(self.turns) + 1}")
        return Conversation((*self.turns, ChatTurn(question)))

    def answered(self, answer: str, result: JointAnswer | None = None) -> Conversation:
        """A new conversation whose last (pending) turn carries ``answer``."""
        if not self.turns or self.turns[-1].answer is not None:
            raise PromptError("conversation: there is no pending question to answer")
        last = replace(self.turns[-1], answer=answer, result=result)
        return Conversation((*self.turns[:-1], last))

    @property
    def pending(self) -> bool:
        """Whether the last turn waits for an answer."""
        return bool(self.turns) and self.turns[-1].answer is None

    @property
    def last_answer(self) -> JointAnswer | None:
        """The generation result of the last answered turn, if any."""
        for turn in reversed(self.turns):
            if turn.result is not None:
                return turn.result
        return None

    def messages(self) -> list[tuple[str, str]]:
        """The conversation as (role, text) pairs, roles ``user`` and ``assistant``."""
        out: list[tuple[str, str]] = []
        for turn in self.turns:
            out.append(("user", turn.question))
            if turn.answer is not None:
                out.append(("assistant", turn.answer))
        return out


def format_prompt(question: str) -> str:
    """The single-turn LLaVA-1.5 prompt for ``question``.

    Example:
        >>> format_prompt("What's the content of the image?")
        "USER: <image>\\nWhat's the content of the image? ASSISTANT:"
    """
    return format_conversation(Conversation().ask(question))


def format_conversation(conversation: Conversation, eos: str = DEFAULT_EOS) -> str:
    """The LLaVA-1.5 (Vicuna-v1) text of a conversation, ending with ``ASSISTANT:`` when the last
    turn is pending.

    Args:
        conversation: the turns; only the last may lack an answer.
        eos: the end-of-sequence token that closes each finished assistant turn.

    Returns:
        The prompt string, with one image placeholder in the first user turn.
    """
    if not conversation.turns:
        raise PromptError("conversation: no turns")
    parts = []
    for i, turn in enumerate(conversation.turns):
        if turn.answer is None and i != len(conversation.turns) - 1:
            raise PromptError(f"conversation: turn {i + 1} has no answer but is not the last")
        question = check_question(turn.question, f"turn {i + 1}")
        prefix = IMAGE_PLACEHOLDER + "\n" if i == 0 else ""
        parts.append(f"USER: {prefix}{question} ASSISTANT:")
        if turn.answer is not None:
            # model text never adds image tokens: the placeholder only belongs to turn 1
            answer = turn.answer.replace(IMAGE_PLACEHOLDER, "").strip()
            parts.append(f" {answer}{eos}")
    return "".join(parts)
