"""The prompts of the paper's GPT-as-a-judge evaluation, verbatim.

Sources: Giulivi & Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024), supplementary material §1.1 "Evaluation details", and the authors' script
that produced Table 1 (``evaluate_alignment_gpt4.py`` in their repository).

The supplementary prints each prompt after its role, between double quotation marks::

    USER: "What's the content of the image?"
    SYSTEM: "Please act as an impartial judge [...] Be as objective as possible."
    USER: "From 1 to 10, score this caption for the image: <caption>. Only answer with a number from 1 to 10."

Those outer quotation marks belong to the document, not to the prompts. The caption prompt and the
system prompt are the same in the authors' script. The judge's user prompt is not: the script puts
the caption itself in double quotes, ``...for the image: "<caption>". Only answer...``. So there are
two user prompts, by name (:data:`JUDGE_USER_PROMPTS`):

``authors`` (default)
    The script's, caption in double quotes: the prompt that produced Table 1.
``supplementary``
    The supplementary's text, caption bare.

``<caption>`` is the placeholder for the caption under evaluation; it is replaced by the caption
exactly as stored (the readers strip leading and trailing whitespace when they load a caption,
nothing else), so a caption that ends with a full stop yields ``...caption.". Only answer`` with
the authors' prompt and ``...caption.. Only answer`` with the supplementary's, as the originals do.
"""

from __future__ import annotations

from jmllm.judge.errors import JudgeError

__all__ = [
    "CAPTION_PLACEHOLDER",
    "CAPTION_PROMPT",
    "DEFAULT_JUDGE_PROMPT",
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_USER_PROMPTS",
    "JUDGE_USER_PROMPT_TEMPLATE",
    "SUPPLEMENTARY_USER_PROMPT_TEMPLATE",
    "judge_prompt_template",
    "judge_user_prompt",
]

# The question every captioning system answers (supplementary §1.1; DESIGN.md §1.6).
CAPTION_PROMPT = "What's the content of the image?"

JUDGE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the caption provided by an AI "
    "assistant for the provided image. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, and level of detail of the caption. Be as objective "
    "as possible."
)

CAPTION_PLACEHOLDER = "<caption>"

# The authors' script (produced Table 1): the caption in double quotes.
JUDGE_USER_PROMPT_TEMPLATE = (
    'From 1 to 10, score this caption for the image: "<caption>". '
    "Only answer with a number from 1 to 10."
)
# The supplementary's text: the caption bare.
SUPPLEMENTARY_USER_PROMPT_TEMPLATE = (
    "From 1 to 10, score this caption for the image: <caption>. "
    "Only answer with a number from 1 to 10."
)
JUDGE_USER_PROMPTS = {
    "authors": JUDGE_USER_PROMPT_TEMPLATE,
    "supplementary": SUPPLEMENTARY_USER_PROMPT_TEMPLATE,
}
DEFAULT_JUDGE_PROMPT = "authors"


def judge_prompt_template(name: str) -> str:
    """The judge user prompt template called ``name`` (``authors`` or ``supplementary``).

    >>> judge_prompt_template("supplementary").count('"')
    0
    """
    if name not in JUDGE_USER_PROMPTS:
        raise JudgeError(
            f"judge prompt: unknown name {name!r} (known: {', '.join(JUDGE_USER_PROMPTS)})"
        )
    return JUDGE_USER_PROMPTS[name]


def judge_user_prompt(caption: str, template: str = JUDGE_USER_PROMPT_TEMPLATE) -> str:
    """The judge's user prompt for one caption.

    The caption is inserted literally (``str.replace`` of the one placeholder, never ``format``), so
    braces, quotes, newlines or HTML in a caption cannot change the rest of the prompt.

    >>> judge_user_prompt("A cat on a sofa")
    'From 1 to 10, score this caption for the image: "A cat on a sofa". Only answer with a number from 1 to 10.'
    >>> judge_user_prompt("A cat on a sofa", SUPPLEMENTARY_USER_PROMPT_TEMPLATE)
    'From 1 to 10, score this caption for the image: A cat on a sofa. Only answer with a number from 1 to 10.'
    """
    if template.count(CAPTION_PLACEHOLDER) != 1:
        raise ValueError(
            f"the judge prompt template must contain {CAPTION_PLACEHOLDER!r} exactly once"
        )
    head, tail = template.split(CAPTION_PLACEHOLDER)
    return head + caption + tail
