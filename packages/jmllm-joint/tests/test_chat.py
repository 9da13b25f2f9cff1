"""LLaVA-1.5 templates and conversations (no model needed)."""

from __future__ import annotations

import pytest

from jmllm.joint import Conversation, PromptError, format_conversation, format_prompt


def test_single_turn_template():
    assert format_prompt("What's the content of the image?") == (
        "USER: <image>\nWhat's the content of the image? ASSISTANT:"
    )


def test_multi_turn_template_separates_turns_with_eos_and_has_one_image():
    conv = Conversation().ask("Q1").answered(" A1 ").ask("Q2").answered("A2").ask("Q3")
    text = format_conversation(conv)
    assert (
        text == "USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>USER: Q3 ASSISTANT:"
    )
    assert text.count("<image>") == 1
    assert conv.messages()[:2] == [("user", "Q1"), ("assistant", " A1 ")]


def test_model_text_cannot_inject_image_placeholders():
    conv = Conversation().ask("Q1").answered("see <image> here").ask("Q2")
    assert format_conversation(conv).count("<image>") == 1


def test_conversation_misuse():
    with pytest.raises(PromptError, match="no answer yet"):
        Conversation().ask("a").ask("b")
    with pytest.raises(PromptError, match="no pending question"):
        Conversation().answered("x")
    with pytest.raises(PromptError, match="turn 1: empty"):
        Conversation().ask("  ")
    with pytest.raises(PromptError, match="no turns"):
        format_conversation(Conversation())


def test_paper_template_is_the_authors_string_verbatim():
    # the authors' scripts: "<image>\nUSER: {question}\nASSISTANT:"
    assert format_prompt("What's the content of the image?", template="paper") == (
        "<image>\nUSER: What's the content of the image?\nASSISTANT:"
    )
    conv = Conversation().ask("Q1").answered("A1").ask("Q2")
    assert format_conversation(conv, template="paper") == (
        "<image>\nUSER: Q1\nASSISTANT: A1</s>\nUSER: Q2\nASSISTANT:"
    )


def test_unknown_template_is_named():
    with pytest.raises(PromptError, match=r"template: unknown conversation template 'vicuna'"):
        format_prompt("Q", template="vicuna")
