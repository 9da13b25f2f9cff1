"""Participant ids: one normal form, so that ids that look alike are one person.

A participant types their id; typing is not exact. ``"P01"``, ``"P01 "``, ``"p01"``, ``"Ｐ０１"``
(full-width) and ``"P\u200b01"`` (a zero-width space pasted from a chat message) look the same to
a person and must be the same participant, or one person answering twice would be scored twice.
:func:`normalise_participant_id` is the one definition, used wherever an id is read (answer files,
submissions), shown (reports, server log, file names) or compared (duplicates); the questionnaire
applies the same steps in JavaScript before it derives the participant's question order.

The steps, in order:

1. Unicode NFKC normalisation: full-width and other compatibility forms become their plain
   equivalents (``Ｐ０１`` → ``P01``, the ``ﬁ`` ligature → ``fi``, a no-break space → a space);
2. every format character (Unicode category Cf: zero-width space, zero-width joiner and
   non-joiner, byte-order mark, soft hyphen, bidirectional marks) is removed;
3. surrounding whitespace is removed and every run of inner whitespace becomes one space;
4. case folding (``str.casefold``: ``P01`` → ``p01``, ``Straße`` → ``strasse``), then NFKC again.

Control characters (Unicode category Cc) are not removed: an id containing one is refused.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_PARTICIPANT_ID_CHARS", "normalise_participant_id", "problem_with_participant_id"]

# The questionnaire's input takes 64 characters; normalisation can lengthen an id a little
# (``ß`` -> ``ss``), so the limit for ids read from files is far above that, not equal to it.
MAX_PARTICIPANT_ID_CHARS = 256


def normalise_participant_id(raw: str) -> str:
    """The normal form of a participant id (module docstring); ``""`` when nothing is left.

    Args:
        raw: the id as typed or as stored in an answer file.

    Returns:
        The id compared, shown and stored everywhere.

    >>> [normalise_participant_id(p) for p in ["P01", " P01 ", "p01", "Ｐ０１", "P\\u200b01"]]
    ['p01', 'p01', 'p01', 'p01', 'p01']
    >>> normalise_participant_id("  Anna\\u00a0\\u00a0Maria  ")
    'anna maria'
    """
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = " ".join(text.split())
    return unicodedata.normalize("NFKC", text.casefold())


def problem_with_participant_id(raw: object) -> str | None:
    """Why ``raw`` cannot be a participant id, or ``None`` when it can.

    >>> problem_with_participant_id("P01") is None
    True
    >>> problem_with_participant_id("\\u200b ")
    'participant_id is empty'
    """
    if not isinstance(raw, str):
        return "missing participant_id"
    if len(raw) > MAX_PARTICIPANT_ID_CHARS:
        return f"participant_id longer than {MAX_PARTICIPANT_ID_CHARS} characters"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in raw):
        return f"participant_id {raw!r} has control or invalid characters"
    if not normalise_participant_id(raw):
        return "participant_id is empty"
    return None
