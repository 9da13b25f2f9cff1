"""The answer side of GA: its tokens and words, and the target a request names."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jmllm.joint.chat.templates import ConversationTemplate, get_template

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


# ---------------------------------------------------------------------------------------------
# Which query an explained word refers to (the ``matching`` class channel)
# ---------------------------------------------------------------------------------------------

# Words that end a noun phrase when read left to right: conjunctions, prepositions, the verbs of
# captions and answers. A phrase also ends at punctuation between two words.
PHRASE_BREAKS = frozenset(
    {
        *("and", "or", "but", "nor", "which", "that", "who", "while", "there"),
        *("with", "without", "on", "in", "at", "of", "to", "from", "by", "near", "beside"),
        *("next", "above", "below", "under", "over", "behind", "between", "inside", "outside"),
        *("is", "are", "was", "were", "be", "been", "being", "has", "have", "having"),
        *("shows", "show", "showing", "contains", "contain", "containing"),
    }
)


@dataclass(frozen=True)
class QueryMatch:
    """The class channel the ``matching`` rule picked for an explained word.

    Attributes:
        index: the query's index, or None when no query names what the word refers to (the
            ``max`` fallback: the maximum over the query channels).
        rule: how it was chosen, for a picture's legend: ``"only query"``, ``"phrase head
            'triangle'"``, ``"query contains 'red'"`` or ``"no query names it: maximum over the
            queries"``.
    """

    index: int | None
    rule: str


def _singular(word: str) -> str:
    """A crude English singular (``crosses`` → ``cross``, ``boxes`` → ``box``, ``cats`` →
    ``cat``, ``berries`` → ``berry``); words that are not plurals come back unchanged."""
    w = word.casefold()
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith(("ses", "xes", "zes", "ches", "shes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _query_words(query: str) -> list[str]:
    return [_singular(m.group()) for m in _WORD.finditer(query)]


def names_a_query(word: str, queries: Sequence[str]) -> bool:
    """Whether ``word`` is the head (last word) of one of ``queries``, singular or plural, any
    case: the noun the ``matching`` rule reads a phrase's object from.

    Example:
        >>> names_a_query("Cats", ["a photo of a cat"]), names_a_query("a", ["a photo of a cat"])
        (True, False)
    """
    return _singular(word) in _query_heads(queries)


def _query_heads(queries: Sequence[str]) -> dict[str, list[int]]:
    """Each query's head noun (its last word, singular) → the indices of the queries it ends."""
    heads: dict[str, list[int]] = {}
    for q, query in enumerate(queries):
        qwords = _query_words(query)
        if qwords:
            heads.setdefault(qwords[-1], []).append(q)
    return heads


def matching_query(text: str, start: int, end: int, queries: Sequence[str]) -> QueryMatch:
    """The query that names the object the word at ``text[start:end]`` refers to.

    The ``matching`` rule of GA's ``class`` map (``docs/fidelity.md``), in order:

    1. with one query, that query (so the authors' single-query scripts are unchanged);
    2. the head noun of the word's noun phrase: reading on from the word to the end of its
       phrase (punctuation, a conjunction, a preposition or a verb, see :data:`PHRASE_BREAKS`),
       the first word that is a query's last word (singular or plural) picks that query — "blue"
       in "a blue triangle" refers to the triangle's query, "cross" to the cross's; when several
       queries end in that noun, the most specific one whose every word is in the phrase is
       preferred ("green cross" before "cross" in "a green cross");
    3. a query whose text contains the word ("red" with the query "red circle");
    4. none: ``index`` None, the maximum over the query channels (stated on the picture).

    Args:
        text: the answer.
        start, end: the explained span's characters (a word, or a token's span).
        queries: the OWL-ViT queries (class channels, in order).

    Example:
        >>> queries = ["circle", "square", "triangle", "cross"]
        >>> text = "a blue triangle, a red cross and a green cross"
        >>> matching_query(text, 2, 6, queries)  # "blue"
        QueryMatch(index=2, rule="phrase head 'triangle'")
        >>> matching_query(text, 0, 1, ["cat"]).rule
        'only query'
        >>> matching_query(text, 29, 32, queries).index is None  # "and"
        True
    """
    if len(queries) == 1:
        return QueryMatch(0, "only query")
    words = list(_WORD.finditer(text))
    first = next((i for i, w in enumerate(words) if w.end() > start and w.start() < end), None)
    if first is None:
        return QueryMatch(None, "no query names it: maximum over the queries")
    heads = _query_heads(queries)
    # the phrase: back to its start (for the preference among queries sharing a head) and on
    # from the explained word to its end
    begin = first
    while begin > 0 and not _breaks(text, words, begin - 1, begin):
        begin -= 1
    stop = first
    while stop + 1 < len(words) and not _breaks(text, words, stop, stop + 1):
        stop += 1
    phrase = {_singular(w.group()) for w in words[begin : stop + 1]}
    if _singular(words[first].group()) not in PHRASE_BREAKS:
        for i in range(first, stop + 1):
            noun = _singular(words[i].group())
            candidates = heads.get(noun)
            if candidates:
                whole = [q for q in candidates if set(_query_words(queries[q])) <= phrase]
                # the most specific whole query ("green cross" before "cross"), else the first
                best = max(whole, key=lambda q: len(_query_words(queries[q])), default=None)
                return QueryMatch(
                    candidates[0] if best is None else best, f"phrase head {words[i].group()!r}"
                )
    said = {_singular(w.group()) for w in words[first:] if w.start() < end}
    for q, query in enumerate(queries):
        if said & set(_query_words(query)):
            return QueryMatch(q, f"query contains {text[start:end].strip()!r}")
    return QueryMatch(None, "no query names it: maximum over the queries")


def _breaks(text: str, words: Sequence[re.Match[str]], left: int, right: int) -> bool:
    """Whether a noun phrase cannot run from word ``left`` on to word ``right``."""
    between = text[words[left].end() : words[right].start()]
    return (
        any(c in between for c in ',.;:!?()[]"')
        or _singular(words[right].group()) in PHRASE_BREAKS
        or _singular(words[left].group()) in PHRASE_BREAKS
    )
