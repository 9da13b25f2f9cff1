"""Conversation templates (``llava-1.5`` and ``paper``) and multi-turn conversations.

J and stock LLaVA are prompted through a *named* template:

``llava-1.5``
    The model card's Vicuna-v1 format, which LLaVA-1.5 (``llava-hf/llava-1.5-*-hf``) was trained
    with: roles ``USER``/``ASSISTANT`` separated by a space, every finished assistant turn closed
    by the end-of-sequence token ``</s>``, the image placeholder only in the first user turn::

        USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:

``paper``
    The string the paper's authors prompt J with in their scripts (captions for the judge, bias
    assessment, CUB heatmaps, hallucination study): the image first, then the turn on its own
    lines::

        <image>\\nUSER: Q1\\nASSISTANT:

    The authors only ever ask one question; later turns continue in the same shape
    (``A1</s>\\nUSER: Q2\\nASSISTANT:``).

Paper-reproduction paths default to ``paper``; interactive use defaults to ``llava-1.5``
(``docs/fidelity.md``). The placeholder is later expanded to one image token per vision patch
(576 for LLaVA-1.5).

Other model families (:mod:`jmllm.joint.model.families`) are prompted in their checkpoints' chat
formats: ``llava-next-mistral`` (``[INST] <image>\\nQ [/INST]``), ``llava-next-vicuna``,
``llava-onevision`` (ChatML) and ``qwen2-vl`` (ChatML with the default system prompt). Asked for
``llava-1.5`` or ``paper`` — LLaVA-1.5's formats, the defaults everywhere — such a J uses its
family's own format instead (:data:`LLAVA_TEMPLATES`), and every answer records the one used.

A generated answer is a :class:`JointAnswer` (its text, its token ids and the prompt's, the
template and tokenization it was asked in, and the reply as the authors' scripts read it:
:func:`authors_reply`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_EOS = "</s>"
# The authors' scripts read an answer as decode(prompt + answer).split("ASSISTANT: ")[1].
AUTHORS_REPLY_MARK = "ASSISTANT: "


@dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation becomes LLaVA's prompt text.

    ``first`` formats the first user turn (it holds ``{image}`` once), ``user`` every later user
    turn, ``answer`` every finished assistant turn; each has ``{question}`` / ``{answer}``.
    """

    name: str
    first: str  # first user turn, with {image} and {question}
    user: str  # later user turns, with {question}
    answer: str  # a finished assistant turn, with {answer} and {eos}


CONVERSATION_TEMPLATES: dict[str, ConversationTemplate] = {
    "llava-1.5": ConversationTemplate(
        name="llava-1.5",
        first="USER: {image}\n{question} ASSISTANT:",
        user="USER: {question} ASSISTANT:",
        answer=" {answer}{eos}",
    ),
    "paper": ConversationTemplate(
        name="paper",
        first="{image}\nUSER: {question}\nASSISTANT:",
        user="\nUSER: {question}\nASSISTANT:",
        answer=" {answer}{eos}",
    ),
}
_QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CONVERSATION_TEMPLATES.update(
    {
        # LLaVA-NeXT on Mistral-7B-Instruct (llava-hf/llava-v1.6-mistral-7b-hf's model card)
        "llava-next-mistral": ConversationTemplate(
            name="llava-next-mistral",
            first="[INST] {image}\n{question} [/INST]",
            user="[INST] {question} [/INST]",
            answer=" {answer}{eos}",
        ),
        # LLaVA-NeXT on Vicuna (llava-hf/llava-v1.6-vicuna-*-hf): Vicuna v1 with its system line
        "llava-next-vicuna": ConversationTemplate(
            name="llava-next-vicuna",
            first="A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions. "
            "USER: {image}\n{question} ASSISTANT:",
            user="USER: {question} ASSISTANT:",
            answer=" {answer}{eos}",
        ),
        # LLaVA-OneVision (llava-hf/llava-onevision-*-hf's chat template): ChatML, image first
        "llava-onevision": ConversationTemplate(
            name="llava-onevision",
            first="<|im_start|>user {image}\n{question}<|im_end|><|im_start|>assistant\n",
            user="<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n",
            answer="{answer}<|im_end|>",
        ),
        # Qwen2-VL / Qwen2.5-VL Instruct's chat template: ChatML, default system prompt; the
        # family expands {image} into <|vision_start|>, the image pads and <|vision_end|>
        "qwen2-vl": ConversationTemplate(
            name="qwen2-vl",
            first=_QWEN_SYSTEM
            + "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
            user="<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
            answer="{answer}<|im_end|>\n",
        ),
    }
)
# LLaVA-1.5's own formats: a J of another family prompted with one of them uses its family's
# format instead (they are the defaults of every command, written for LLaVA-1.5)
LLAVA_TEMPLATES = ("llava-1.5", "paper")
INTERACTIVE_TEMPLATE = "llava-1.5"  # chat, describe, the demo, the explorer app
INTERACTIVE_MAX_NEW_TOKENS = 64  # the commands' --max-new-tokens default
PAPER_TEMPLATE = "paper"  # judge captions, bias, WSOL, user-study maps, hallucination audit


@dataclass
class JointAnswer:
    """One generated answer.

    Attributes:
        text: the decoded answer, special tokens removed, stripped.
        token_ids: (A,) generated token ids, answer only (no prompt, no padding, no EOS).
        prompt_ids: (P,) the prompt's token ids, image tokens expanded, no padding.
        prompt: the prompt text (before image-token expansion).
        finished: whether generation stopped at the end-of-sequence token.
        vision: ``"joint"`` (W(t)) or ``"llava"`` (stock vision tower and projector).
        template: the conversation template the prompt was put in (``"llava-1.5"``,
            ``"paper"``).
        tokenization: how the prompt was tokenised (``"legacy"``, ``"checkpoint"``; see
            :mod:`jmllm.joint.chat.tokenization`).
        reply: the answer as the authors' scripts read it (:func:`authors_reply`): raw, not
            stripped; None when their reading finds no answer.
        first_logits: (V,) float32 logits of the first answer token, when asked for
            (``JointModel.generate(..., first_token_logits=True)``); None otherwise.
    """

    text: str
    token_ids: torch.Tensor
    prompt_ids: torch.Tensor
    prompt: str
    finished: bool
    vision: str = "joint"
    template: str = INTERACTIVE_TEMPLATE
    tokenization: str = INTERACTIVE_TOKENIZATION
    reply: str | None = None
    first_logits: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def full_ids(self) -> torch.Tensor:
        """Prompt and answer ids together: the input that reproduces the answer's logits."""
        return torch.cat([self.prompt_ids, self.token_ids])

    @property
    def tokens(self) -> int:
        return int(self.token_ids.numel())


def authors_reply(prompt_text: str, full_text: str) -> str | None:
    """The answer as the authors' scripts read it from the decoded prompt and answer.

    Their scripts decode prompt and answer together (special tokens skipped, no clean-up of
    spaces) and take ``text.split("ASSISTANT: ")[1]``: the raw text after the prompt's
    ``ASSISTANT:`` and one space, up to a next ``ASSISTANT: `` the model may have written. For a
    conversation, the turn answered last is taken (the prompt's own ``ASSISTANT: `` are
    skipped). None when there is no such text: the answer does not begin with a space (their
    ``[1]`` raises, and their bias script skips the portrait).

    Args:
        prompt_text: the decoded prompt.
        full_text: the decoded prompt and answer.

    Example:
        >>> prompt = "\\nUSER: Is there a cat in the image?\\nASSISTANT:"
        >>> authors_reply(prompt, prompt + " Yes"), authors_reply(prompt, prompt + "  Yes\\n")
        ('Yes', ' Yes\\n')
        >>> authors_reply(prompt, prompt + "Yes") is None
        True
    """
    parts = full_text.split(AUTHORS_REPLY_MARK)
    index = prompt_text.count(AUTHORS_REPLY_MARK) + 1
    return parts[index] if len(parts) > index else None


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """The :class:`ConversationTemplate` named ``template`` (or ``template`` itself).

    Raises:
        PromptError: an unknown name; the message lists the known ones.

    Example:
        >>> get_template("paper").first
        '{image}\\nUSER: {question}\\nASSISTANT:'
    """
    if isinstance(template, ConversationTemplate):
        return template
    if isinstance(template, str) and template in CONVERSATION_TEMPLATES:
        return CONVERSATION_TEMPLATES[template]
    known = ", ".join(sorted(CONVERSATION_TEMPLATES))
    raise PromptError(f"template: unknown conversation template {template!r} (known: {known})")


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


def format_prompt(
    question: str, template: str | ConversationTemplate = INTERACTIVE_TEMPLATE
) -> str:
    """The single-turn prompt for ``question`` in the named conversation template.

    Example:
        >>> format_prompt("What's the content of the image?")
        "USER: <image>\\nWhat's the content of the image? ASSISTANT:"
        >>> format_prompt("What's the content of the image?", template="paper")
        "<image>\\nUSER: What's the content of the image?\\nASSISTANT:"
    """
    return format_conversation(Conversation().ask(question), template=template)


def format_conversation(
    conversation: Conversation,
    eos: str = DEFAULT_EOS,
    template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
) -> str:
    """The text of a conversation in a named template, ending with ``ASSISTANT:`` when the last
    turn is pending.

    Args:
        conversation: the turns; only the last may lack an answer.
        eos: the end-of-sequence token that closes each finished assistant turn.
        template: ``"llava-1.5"`` (default), ``"paper"`` or a :class:`ConversationTemplate`.

    Returns:
        The prompt string, with one image placeholder in the first user turn.
    """
    form = get_template(template)
    if not conversation.turns:
        raise PromptError("conversation: no turns")
    parts = []
    for i, turn in enumerate(conversation.turns):
        if turn.answer is None and i != len(conversation.turns) - 1:
            raise PromptError(f"conversation: turn {i + 1} has no answer but is not the last")
        question = check_question(turn.question, f"turn {i + 1}")
        if i == 0:
            parts.append(form.first.format(image=IMAGE_PLACEHOLDER, question=question))
        else:
            parts.append(form.user.format(question=question))
        if turn.answer is not None:
            # model text never adds image tokens: the placeholder only belongs to turn 1
            answer = turn.answer.replace(IMAGE_PLACEHOLDER, "").strip()
            parts.append(form.answer.format(answer=answer, eos=eos))
    return "".join(parts)
