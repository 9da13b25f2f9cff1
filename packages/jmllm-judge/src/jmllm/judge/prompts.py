"""The prompts of the paper's GPT-as-a-judge evaluation, verbatim.

Source: Giulivi & Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024), supplementary material §1.1 "Evaluation details".

The supplementary prints each prompt after its role, between double quotation marks::

    USER: "What's the content of the image?"
    SYSTEM: "Please act as an impartial judge [...] Be as objective as possible."
    USER: "From 1 to 10, score this caption for the image: <caption>. Only answer with a number from 1 to 10."

Those quotation marks belong to the document, not to the prompts: they delimit the prompt in running
text exactly as the role label in front of them does, and the project's DESIGN.md quotes the same
caption prompt (and the bias prompt of §4) without them. So the strings below carry no surrounding
quotes. ``<caption>`` is the placeholder for the caption under evaluation; it is replaced by the
caption exactly as stored (the readers strip leading and trailing whitespace when they load a
caption, nothing else), so a caption that ends with a full stop yields ``...caption.. Only answer``
as the paper's template does.
"""

from __future__ import annotations

__all__ = [
    "CAPTION_PLACEHOLDER",
    "CAPTION_PROMPT",
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_USER_PROMPT_TEMPLATE",
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

JUDGE_USER_PROMPT_TEMPLATE = (
    "From 1 to 10, score this caption for the image: <caption>. "
    "Only answer with a number from 1 to 10."
)


def judge_user_prompt(caption: str, template: str = JUDGE_USER_PROMPT_TEMPLATE) -> str:
    """The judge's user prompt for one caption.

    The caption is inserted literally (``str.replace`` of the one placeholder, never ``format``), so
    braces, quotes, newlines or HTML in a caption cannot change the rest of the prompt.

    >>> judge_user_prompt("A cat on a sofa")
    'From 1 to 10, score this caption for the image: A cat on a sofa. Only answer with a number from 1 to 10.'
    """
    if template.count(CAPTION_PLACEHOLDER) != 1:
        raise ValueError(
            f"the judge prompt template must contain {CAPTION_PLACEHOLDER!r} exactly once"
        )
    head, tail = template.split(CAPTION_PLACEHOLDER)
    return head + caption + tail
