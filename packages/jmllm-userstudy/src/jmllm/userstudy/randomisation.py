"""Per-participant question and explanation order, identical in Python and in the questionnaire.

The questionnaire (``questionnaire.js``) and scoring must agree on what every participant saw, so
both run the same tiny integer algorithm:

1. ``participant_seed = fnv1a32(utf8(f"{study_seed}\\n{participant_id}"))``
2. a Mulberry32 generator seeded with it;
3. Fisher–Yates shuffle of the question indices, ``j = next_u32() % (i + 1)`` for ``i = n-1 .. 1``;
4. then, for each shown position in turn, ``swapped = next_u32() >> 31`` (1: the spec's
   explanation 2 is shown as "Explanation 1").

Only 32-bit integer operations are used, so JavaScript (``Math.imul``, ``>>> 0``) and Python give
the same bits. Answer files record the order; scoring recomputes it and flags any mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Mulberry32", "ShownQuestion", "fnv1a32", "participant_order", "participant_seed"]

_MASK = 0xFFFFFFFF


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a hash.

    >>> hex(fnv1a32(b"a"))
    '0xe40c292c'
    """
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & _MASK
    return h


class Mulberry32:
    """Mulberry32, a 32-bit PRNG small enough to write identically in JavaScript.

    >>> rng = Mulberry32(1)
    >>> [rng.next_u32() for _ in range(2)]
    [2693262067, 11749833]
    """

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next_u32(self) -> int:
        """The next unsigned 32-bit output."""
        self.state = (self.state + 0x6D2B79F5) & _MASK
        t = self.state
        t = ((t ^ (t >> 15)) * (t | 1)) & _MASK
        t = ((t + (((t ^ (t >> 7)) * (t | 61)) & _MASK)) & _MASK) ^ t
        return (t ^ (t >> 14)) & _MASK


@dataclass(frozen=True)
class ShownQuestion:
    """What a participant saw at one position of the questionnaire.

    Attributes:
        position: 1-based position in the participant's questionnaire.
        question_id: The spec question shown there.
        swapped: True when the spec's explanation 2 was shown as "Explanation 1" (so the
            participant's A1/A2 must be flipped to compare with the spec's ``correct``).
    """

    position: int
    question_id: str
    swapped: bool


def participant_seed(study_seed: int, participant_id: str) -> int:
    """The 32-bit seed of one participant's order.

    >>> participant_seed(2024, "P01")
    4266857536
    """
    text = f"{study_seed}\n{participant_id}"
    # Like the browser's TextEncoder, encode a lone surrogate as U+FFFD instead of failing.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return fnv1a32(text.encode("utf-8"))


def participant_order(
    question_ids: Sequence[str], study_seed: int, participant_id: str
) -> list[ShownQuestion]:
    """The order and explanation swaps one participant sees.

    Args:
        question_ids: The spec's question ids, in spec order.
        study_seed: The spec's ``seed``.
        participant_id: The id the participant typed (exactly as stored in the answer file).

    Returns:
        One :class:`ShownQuestion` per question, in the order shown.

    >>> [(s.question_id, s.swapped) for s in participant_order(["a", "b", "c"], 7, "P1")]
    [('c', False), ('b', True), ('a', False)]
    """
    rng = Mulberry32(participant_seed(study_seed, participant_id))
    order = list(range(len(question_ids)))
    for i in range(len(order) - 1, 0, -1):
        j = rng.next_u32() % (i + 1)
        order[i], order[j] = order[j], order[i]
    return [
        ShownQuestion(
            position=k + 1, question_id=question_ids[idx], swapped=rng.next_u32() >> 31 == 1
        )
        for k, idx in enumerate(order)
    ]
