"""LLaVA-1.5's prompt tokenization by name: ``legacy`` (the authors' token ids) or ``checkpoint``.

LLaVA-1.5's tokenizer is Llama's SentencePiece vocabulary as a BPE with byte fallback. Whether a
``▁`` (id 29871) follows a special token such as ``<image>`` depends on the tokenizer's
*prepend scheme*, and transformers 5 sets it from the checkpoint's ``legacy`` flag:
``LlamaTokenizer.__init__`` rebuilds the pre-tokenizer as ``Metaspace(prepend_scheme="first")``
when ``tokenizer_config.json`` says ``legacy: false`` or omits it, and as
``Metaspace(prepend_scheme="always")`` when it says ``legacy: true``. So, for the ``paper``
template's ``<image>\\nUSER: …``:

==============  =====================================  ==========================================
name            ids                                    who
==============  =====================================  ==========================================
``legacy``      ``1, 32000, 29871, 13, …``             the authors' setup (transformers 4.x), and
                                                       LLaVA's own training code, which tokenised
                                                       the text after ``<image>`` on its own
``checkpoint``  ``1, 32000, 13, …``                    ``llava-hf/llava-1.5-7b-hf`` loaded by
                                                       transformers 5 as its config says
==============  =====================================  ==========================================

and for the model card's ``USER: <image>\\n…``: ``1, 3148, 1001, 29901, 29871, 32000, 29871, 13,
…`` (``legacy``) against ``…, 32000, 13, …`` (``checkpoint``). Text without special tokens (an
answer, a question alone) is tokenised the same way under both.

``legacy`` is the default of the paper-reproduction paths (judge captions, bias, WSOL, user-study
maps, the hallucination audit): it reproduces the authors' ids exactly. ``checkpoint`` is the
default of interactive use. The choice is made here alone, for LLaVA-1.5's Llama tokenizer:
another model family's tokenizer (a byte-level BPE, say) has no such flag, and asking it for
``legacy`` is an error that names the tokenizer.

Example:
    >>> from jmllm.joint.chat.tokenization import TOKENIZATIONS, check_tokenization
    >>> TOKENIZATIONS
    ('legacy', 'checkpoint')
    >>> check_tokenization("legacy")
    'legacy'
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "INTERACTIVE_TOKENIZATION",
    "PAPER_TOKENIZATION",
    "TOKENIZATIONS",
    "TokenizationError",
    "check_tokenization",
    "llava_tokenizer",
    "prepend_scheme",
]

TOKENIZATIONS = ("legacy", "checkpoint")
PAPER_TOKENIZATION = "legacy"  # judge captions, bias, WSOL, user-study maps, the audit
INTERACTIVE_TOKENIZATION = "checkpoint"  # chat, describe, explain, the demo, the explorer app
_LEGACY_SCHEME = "always"  # what transformers' legacy=True gives a Llama tokenizer


class TokenizationError(ValueError):
    """A tokenization name is unknown, or LLaVA's tokenizer cannot take it (message says which)."""


def check_tokenization(name: object) -> str:
    """``name`` if it is a known tokenization, else :class:`TokenizationError` listing them.

    Example:
        >>> check_tokenization("first")
        Traceback (most recent call last):
        ...
        jmllm.joint.chat.tokenization.TokenizationError: tokenization: unknown tokenization 'first' \
(known: legacy, checkpoint)
    """
    if isinstance(name, str) and name in TOKENIZATIONS:
        return name
    raise TokenizationError(
        f"tokenization: unknown tokenization {name!r} (known: {', '.join(TOKENIZATIONS)})"
    )


def _metaspaces(pre_tokenizer: Any) -> list[Any]:
    """The Metaspace pre-tokenizers of a pre-tokenizer (itself, or the members of a Sequence)."""
    from tokenizers import pre_tokenizers

    if isinstance(pre_tokenizer, pre_tokenizers.Metaspace):
        return [pre_tokenizer]
    if isinstance(pre_tokenizer, pre_tokenizers.Sequence):
        found: list[Any] = []
        index = 0
        while True:
            try:
                member = pre_tokenizer[index]
            except IndexError:
                return found
            found.extend(_metaspaces(member))
            index += 1
    return []


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizationError(
            f"tokenization: {type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
            "LLaVA-1.5's tokenization can only be chosen for one"
        )
    return backend


def prepend_scheme(tokenizer: Any) -> str | None:
    """The prepend scheme of a SentencePiece-style tokenizer's ``▁`` (``"always"``: one after
    every special token, as ``legacy``; ``"first"``: only at the start of the text), or None
    when its pre-tokenizer has no Metaspace (another tokenizer family).

    Example:
        >>> from jmllm.align.testing import tiny_llava_tokenizer
        >>> prepend_scheme(tiny_llava_tokenizer())
        'always'
    """
    spaces = _metaspaces(_backend(tokenizer).pre_tokenizer)
    return str(spaces[0].prepend_scheme) if spaces else None


def llava_tokenizer(tokenizer: Any, tokenization: str) -> Any:
    """LLaVA-1.5's tokenizer under a named tokenization.

    ``checkpoint`` returns ``tokenizer`` itself (as loaded from the checkpoint). ``legacy``
    returns ``tokenizer`` when it already prepends ``▁`` after every special token, else a copy
    whose Metaspace pre-tokenizer does (``prepend_scheme="always"``, what transformers builds for
    ``legacy=True``); the vocabulary, merges, special tokens and decoder are the same.

    Args:
        tokenizer: LLaVA's (fast) tokenizer.
        tokenization: ``"legacy"`` or ``"checkpoint"``.

    Raises:
        TokenizationError: an unknown name, or ``legacy`` for a tokenizer without a SentencePiece
            Metaspace pre-tokenizer (not LLaVA-1.5's kind).

    Example:
        >>> from jmllm.align.testing import tiny_llava_tokenizer
        >>> tok = tiny_llava_tokenizer()
        >>> llava_tokenizer(tok, "checkpoint") is tok
        True
    """
    check_tokenization(tokenization)
    if tokenization == "checkpoint":
        return tokenizer
    spaces = _metaspaces(_backend(tokenizer).pre_tokenizer)
    if not spaces:
        raise TokenizationError(
            f"tokenization legacy: LLaVA's tokenizer ({type(tokenizer).__name__}) has no "
            "SentencePiece Metaspace pre-tokenizer, so it has no legacy behaviour; use "
            "tokenization 'checkpoint'"
        )
    if all(space.prepend_scheme == _LEGACY_SCHEME for space in spaces):
        return tokenizer
    legacy = copy.deepcopy(tokenizer)
    for space in _metaspaces(legacy.backend_tokenizer.pre_tokenizer):
        space.prepend_scheme = _LEGACY_SCHEME  # the tokenizers object writes through
    if hasattr(legacy, "legacy"):
        legacy.legacy = True
    return legacy
