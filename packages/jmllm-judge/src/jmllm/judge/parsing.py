"""Step 4: the strict reader of the judge's 1–10 score.

The judge is told "Only answer with a number from 1 to 10." A reply counts as a score only when it is
exactly that: an integer from 1 to 10 written in ASCII digits without a sign or leading zero, with
optional surrounding whitespace and at most one sentence-final full stop (``"7"``, ``" 10\\n"``,
``"7."``). Everything else — ``"7/10"``, ``"Score: 7"``, ``"7.5"``, ``"8.0"``, ``"0"``, ``"11"``,
``"seven"``, ``"07"``, an empty reply — is *invalid*: counted, reported with the raw reply, and
excluded from every mean. Guessing a number out of free text would turn a judge that did not follow
the instruction into a score.
"""

from __future__ import annotations

import re

__all__ = ["SCORE_MAX", "SCORE_MIN", "parse_score"]

SCORE_MIN = 1
SCORE_MAX = 10

# ASCII digits only (``\d`` would accept other scripts' digits), no leading zero.
_SCORE = re.compile(r"\s*(10|[1-9])\.?\s*", re.ASCII)


def parse_score(reply: str | None) -> int | None:
    """The score in ``reply``, or ``None`` if the reply is not a bare integer from 1 to 10.

    >>> parse_score("7"), parse_score(" 10.\\n"), parse_score("7/10"), parse_score("11")
    (7, 10, None, None)
    """
    if reply is None:
        return None
    match = _SCORE.fullmatch(reply)
    return int(match.group(1)) if match else None
