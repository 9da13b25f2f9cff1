"""Step 4: the readers of the judge's 1–10 score, by name.

The judge is told "Only answer with a number from 1 to 10." Two readers turn its reply into a score:

``authors``
    What the authors' evaluation script does, and so what produced the supplementary's Table 1:
    Python's ``int(reply)``, the reply skipped when that fails. It accepts ``"+7"``, ``"07"``,
    ``" 7 "``, other scripts' digits and out-of-range numbers (``"0"``, ``"11"``), and rejects
    ``"7."``. The default of ``jmllm-judge report``, which reproduces Table 1.
``strict``
    Exactly what the instruction asks for: an integer from 1 to 10 written in ASCII digits without
    a sign or leading zero, with optional surrounding whitespace and at most one sentence-final
    full stop (``"7"``, ``" 10\\n"``, ``"7."``). Everything else — ``"7/10"``, ``"Score: 7"``,
    ``"7.5"``, ``"8.0"``, ``"0"``, ``"11"``, ``"seven"``, ``"07"``, an empty reply — is invalid.

With either reader an invalid reply is counted, reported with the raw reply, and excluded from
every mean; no number is ever guessed out of free text. Replies are stored raw, so a report can be
re-read with the other reader without asking the judge again, and every report lists the replies
on which the two readers disagree.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_SCORE_PARSER", "SCORE_MAX", "SCORE_MIN", "SCORE_PARSERS", "parse_score"]

SCORE_MIN = 1
SCORE_MAX = 10

# ASCII digits only (``\d`` would accept other scripts' digits), no leading zero.
_SCORE = re.compile(r"\s*(10|[1-9])\.?\s*", re.ASCII)


SCORE_PARSERS = ("authors", "strict")
DEFAULT_SCORE_PARSER = "authors"  # Table 1 was computed with the authors' int(reply)


def parse_score(reply: str | None, parser: str = "strict") -> int | None:
    """The score in ``reply`` as the named reader reads it, or ``None`` for an invalid reply.

    Args:
        reply: the judge's raw reply (``None``: no reply).
        parser: ``"strict"`` (a bare integer from 1 to 10) or ``"authors"`` (``int(reply)``).

    >>> parse_score("7"), parse_score(" 10.\\n"), parse_score("7/10"), parse_score("11")
    (7, 10, None, None)
    >>> parse_score("11", "authors"), parse_score("7.", "authors"), parse_score("+7", "authors")
    (11, None, 7)
    """
    if parser not in SCORE_PARSERS:
        raise ValueError(f"score parser: unknown {parser!r} (known: {', '.join(SCORE_PARSERS)})")
    if reply is None:
        return None
    if parser == "authors":
        try:
            return int(reply)
        except ValueError:
            return None
    match = _SCORE.fullmatch(reply)
    return int(match.group(1)) if match else None
