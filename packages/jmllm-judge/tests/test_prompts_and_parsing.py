from __future__ import annotations

import re
from pathlib import Path

import pytest

from jmllm.judge.errors import JudgeError
from jmllm.judge.parsing import parse_score
from jmllm.judge.prompts import (
    CAPTION_PROMPT,
    JUDGE_SYSTEM_PROMPT,
    JUDGE_USER_PROMPT_TEMPLATE,
    JUDGE_USER_PROMPTS,
    SUPPLEMENTARY_USER_PROMPT_TEMPLATE,
    judge_prompt_template,
    judge_user_prompt,
)


def test_prompts_are_the_papers_verbatim() -> None:
    assert CAPTION_PROMPT == "What's the content of the image?"
    assert JUDGE_SYSTEM_PROMPT == (
        "Please act as an impartial judge and evaluate the quality of the caption provided by an AI "
        "assistant for the provided image. Your evaluation should consider factors such as the "
        "helpfulness, relevance, accuracy, depth, and level of detail of the caption. Be as objective "
        "as possible."
    )
    # the default: the authors' script (Table 1), caption in double quotes
    assert judge_user_prompt("A dog.") == (
        'From 1 to 10, score this caption for the image: "A dog.". Only answer with a number from 1 to 10.'
    )
    # by name: the supplementary's printed text, caption bare
    assert judge_user_prompt("A dog.", judge_prompt_template("supplementary")) == (
        "From 1 to 10, score this caption for the image: A dog.. Only answer with a number from 1 to 10."
    )
    assert JUDGE_USER_PROMPTS == {
        "authors": JUDGE_USER_PROMPT_TEMPLATE,
        "supplementary": SUPPLEMENTARY_USER_PROMPT_TEMPLATE,
    }
    with pytest.raises(JudgeError, match="unknown name 'gpt'"):
        judge_prompt_template("gpt")


def _supplementary() -> Path | None:
    """The paper's supplementary in the steering folder beside the checkout, when there is one."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "paper" / "supplementary.md"
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.skipif(
    _supplementary() is None, reason="the paper's supplementary is not beside this checkout"
)
def test_prompts_match_the_supplementary_text() -> None:
    text = _supplementary().read_text(encoding="utf-8")  # type: ignore[union-attr]
    # Each prompt stands on its own line as ROLE: "prompt"; the quotes are the document's.
    prompts = re.findall(r'^(USER|SYSTEM): "(.*)"\s*$', text, flags=re.MULTILINE)
    assert prompts == [
        ("USER", CAPTION_PROMPT),
        ("SYSTEM", JUDGE_SYSTEM_PROMPT),
        ("USER", SUPPLEMENTARY_USER_PROMPT_TEMPLATE),
    ]
    # the authors' form differs from the printed text only by the quotes around the caption
    assert (
        SUPPLEMENTARY_USER_PROMPT_TEMPLATE.replace("<caption>", '"<caption>"')
        == JUDGE_USER_PROMPT_TEMPLATE
    )


@pytest.mark.parametrize(
    "caption",
    [
        "He said \"hi\" and 'bye'",
        "line one\nline two\r\nline three",
        "<b>bold</b> <script>alert(1)</script> &amp; | pipe",
        "{caption} {0} %s <caption> \\n",
        "",
        "emoji 🐶 and ünïcödé",
    ],
)
def test_caption_is_inserted_literally(caption: str) -> None:
    for template in JUDGE_USER_PROMPTS.values():
        head, tail = template.split("<caption>")
        assert judge_user_prompt(caption, template) == head + caption + tail


def test_template_must_have_one_placeholder() -> None:
    with pytest.raises(ValueError):
        judge_user_prompt("x", "no placeholder")
    with pytest.raises(ValueError):
        judge_user_prompt("x", "<caption> twice <caption>")


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("1", 1),
        ("7", 7),
        ("10", 10),
        (" 8 ", 8),
        ("9\n", 9),
        ("7.", 7),
        ("\t10.\n", 10),
    ],
)
def test_valid_scores(reply: str, score: int) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    "reply",
    [
        None, "", " ", "0", "11", "-3", "+7", "07", "7.5", "8.0", "7/10", "Score: 7", "7 out of 10",
        "seven", "7 7", "7..", "**7**", "١٠", "７", "10/10", "I would rate it 8.", "8\nBecause",
    ],
)  # fmt: skip
def test_invalid_replies(reply: str | None) -> None:
    assert parse_score(reply) is None


@pytest.mark.parametrize(
    ("reply", "score"),
    [("7", 7), ("+7", 7), ("07", 7), (" 8 \n", 8), ("11", 11), ("0", 0), ("-3", -3), ("١٠", 10),
     ("７", 7), ("7.", None), ("7/10", None), ("seven", None), ("", None), (None, None)],
)  # fmt: skip
def test_authors_reader_is_int_of_the_reply(reply: str | None, score: int | None) -> None:
    assert parse_score(reply, "authors") == score


def test_unknown_reader_is_named() -> None:
    with pytest.raises(ValueError, match="score parser: unknown 'x'"):
        parse_score("7", "x")
