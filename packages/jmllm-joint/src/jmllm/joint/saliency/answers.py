"""The answer side of GA: its tokens and words, and the target a request names."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jmllm.joint.chat import ConversationTemplate, get_template

# ---------------------------------------------------------------------------------------------
# Answer tokens and words
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


class GAError(ValueError):
    """A GA request cannot be served; the message names the input and the problem."""


@dataclass(frozen=True)
class AnswerToken:
    """One answer token: its index in the answer, id, text piece and character span."""

    position: int
    token_id: int
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class AnswerWord:
    """A word of the answer (``[^\\W_]+`` runs, inner ``'``/``-`` kept) and its token positions."""

    text: str
    start: int
    end: int
    positions: tuple[int, ...]


def answer_tokens(
    tokenizer: Any, token_ids: Sequence[int] | torch.Tensor
) -> tuple[str, list[AnswerToken]]:
    """The decoded answer and every token's character span (by decoding growing prefixes)."""
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    tokens, previous = [], ""
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        start = len(previous) if prefix.startswith(previous) else _common_prefix(prefix, previous)
        tokens.append(AnswerToken(i, ids[i], prefix[start:], start, len(prefix)))
        previous = prefix
    return text, tokens


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def answer_words(text: str, tokens: Sequence[AnswerToken]) -> list[AnswerWord]:
    """The words of ``text`` with the positions of the tokens that overlap each."""
    words = []
    for match in _WORD.finditer(text):
        positions = tuple(
            tok.position for tok in tokens if tok.start < match.end() and tok.end > match.start()
        )
        if positions:
            words.append(AnswerWord(match.group(), match.start(), match.end(), positions))
    return words


def _template_name(answer: Any, template: str | ConversationTemplate) -> str:
    """The name of the conversation template an explained answer's prompt was put in."""
    if hasattr(answer, "token_ids") and isinstance(getattr(answer, "template", None), str):
        return str(answer.template)
    return get_template(template).name


def resolve_target(
    target: int | str | Sequence[int],
    text: str,
    tokens: Sequence[AnswerToken],
    occurrence: int = 0,
) -> tuple[list[int], str]:
    """Answer positions of a target (position, word, or list of positions) and its label;
    GAError if absent."""
    words = answer_words(text, tokens)
    listing = ", ".join(repr(w.text) for w in words) or "(no words)"
    if isinstance(target, (list, tuple)):
        n = len(tokens)
        if not target or not all(isinstance(i, int) and not isinstance(i, bool) for i in target):
            raise GAError("target: a list of positions must be non-empty and hold only integers")
        outside = [i for i in target if not -n <= i < n]
        if outside:
            raise GAError(
                f"target: positions {outside} are outside the answer ({n} tokens, 0..{n - 1}); "
                f"its words: {listing}"
            )
        positions = sorted({i % n for i in target})
        span = text[tokens[positions[0]].start : tokens[positions[-1]].end].strip()
        return positions, span or "#" + ",".join(map(str, positions))
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise GAError(f"target: expected a position or a word, got {type(target).__name__}")
    if isinstance(target, int):
        n = len(tokens)
        if not -n <= target < n:
            raise GAError(
                f"target: position {target} is outside the answer ({n} tokens, 0..{n - 1}); "
                f"its words: {listing}"
            )
        pos = target % n
        return [pos], f"#{pos}"
    wanted = target.strip().casefold()
    matches = [w for w in words if w.text.casefold() == wanted]
    if not wanted or len(matches) <= occurrence:
        raise GAError(
            f"target: word {target!r} is not in the answer {text!r}; its words: {listing}"
        )
    return list(matches[occurrence].positions), matches[occurrence].text
