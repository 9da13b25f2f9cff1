"""One user's session of the explorer: its state, and the checks on what the user sends.

- :class:`ExplorerState`: what one user has done (the image's embedding, the conversation, the
  explanations so far), never changed in place: every step of
  :class:`~jmllm.joint.app.explorer.Explorer` returns a new one; :class:`WordExplanation`: what
  explaining one clicked word gave, and what it cost.
- :func:`check_upload`, :func:`parse_queries`: an upload's size and the typed object names,
  refused with :class:`ExplorerError` (one sentence naming the input) past their limits.
- :func:`shown_size`: the size a picture is shown at in the page (:data:`DISPLAY_SIDE`), and
  :data:`KEPT_SIDE`: the size of the copy of its image a session keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jmllm.joint.chat.templates import Conversation
from jmllm.joint.model.joint import JointAnswer, JointEmbedding
from jmllm.joint.render.drawing import MIN_SIDE, picture_size
from jmllm.joint.saliency import AnswerWord, GAResult

MAX_UPLOAD_BYTES = 50 * 1024 * 1024  # one uploaded file; the page refuses larger ones itself
MAX_QUERIES = 16  # every query is a GA channel: the norm computation grows with their number
DISPLAY_SIDE = 1024  # pictures shown in the page are at most this large…
DISPLAY_MIN_SIDE = MIN_SIDE  # …and small ones are enlarged to this, so labels are legible
# What a session keeps of its image: a copy at most this large (the models see 768 px at most,
# the page shows 1024), never the upload: 3 MB for any photo instead of up to 50 MB at 4096 px.
KEPT_SIDE = DISPLAY_SIDE


class ExplorerError(ValueError):
    """A request the explorer cannot serve; the message names the input and the problem."""


@dataclass(frozen=True)
class ExplorerState:
    """What one user has done: never changed in place, every step returns a new one.

    Attributes:
        image_name: the file name shown in messages.
        emb: J's embedding of the image (``t`` and the image at most :data:`KEPT_SIDE` pixels
            large, boxes in its original pixels); None before an upload.
        notice: the model's warning about the image (e.g. the toy world's for a photo), or "".
        conversation: J's conversation about the image.
        stock: stock LLaVA's answers to the same questions (None until a comparison is asked).
        typed_queries: the objects the user typed (empty: the object words of the last answer).
        threshold: detection score threshold.
        explained: GA results of the last answer, by (word index, queries).
        attributions: other methods' maps of the last answer, by (word index, method).
        hallucination: the hallucination view of the last answer, once asked for.
    """

    image_name: str = ""
    emb: JointEmbedding | None = None
    notice: str = ""
    conversation: Conversation = field(default_factory=Conversation)
    stock: Conversation | None = None
    typed_queries: tuple[str, ...] = ()
    threshold: float = 0.1
    explained: dict[tuple[int, tuple[str, ...]], GAResult] = field(default_factory=dict)
    attributions: dict[tuple[int, str], Any] = field(default_factory=dict)
    hallucination: Any = None

    @property
    def last_answer(self) -> JointAnswer | None:
        """J's last answer (None before the first question)."""
        return self.conversation.last_answer

    @property
    def last_question(self) -> str:
        turns = self.conversation.turns
        return turns[-1].question if turns else ""


@dataclass(frozen=True)
class WordExplanation:
    """The GA explanation of one clicked word, and what it cost.

    Attributes:
        index: the word's index among the answer's words.
        word: the word (its token positions in the answer).
        queries: the OWL-ViT queries of the class channels.
        result: the :class:`~jmllm.joint.GAResult`.
        norms_cached: whether the (image, queries) norms were already known.
        reused: whether the result itself was already in the state (no GA work at all).
        seconds: time spent on GA (0 when reused).
    """

    index: int
    word: AnswerWord
    queries: tuple[str, ...]
    result: GAResult
    norms_cached: bool
    reused: bool
    seconds: float


def parse_queries(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Object names from a comma- (or newline-) separated string, trimmed, without repeats.

    Raises:
        ExplorerError: more than :data:`MAX_QUERIES` names.

    Example:
        >>> parse_queries(" cat, dog ,, cat\\nred circle")
        ('cat', 'dog', 'red circle')
    """
    if text is None:
        return ()
    parts = text.replace("\n", ",").split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(" ".join(p.split()) for p in parts if p and p.strip()))
    if len(names) > MAX_QUERIES:
        raise ExplorerError(
            f"queries: {len(names)} objects; at most {MAX_QUERIES} at a time (each one is a GA "
            "channel whose gradient norms are computed for every patch)"
        )
    return names


def check_upload(
    path: str | Path, name: str | None = None, max_bytes: int = MAX_UPLOAD_BYTES
) -> int:
    """The size in bytes of an uploaded file, refused when missing or larger than ``max_bytes``
    (its pixels are checked from its header by :func:`jmllm.align.images.open_image`).

    Raises:
        ExplorerError: the message names the file.

    Example:
        >>> check_upload("photo.jpg", max_bytes=2**20)  # doctest: +SKIP
        183511
    """
    path = Path(path)
    name = name or path.name
    try:
        size_bytes = path.stat().st_size
    except OSError:
        raise ExplorerError(f"{name}: no such file") from None
    if size_bytes > max_bytes:
        raise ExplorerError(
            f"{name}: file too large ({size_bytes / 2**20:.1f} MB); the limit is "
            f"{max_bytes / 2**20:.0f} MB"
        )
    return size_bytes


def _named(message: str, path: Path, name: str) -> str:
    """``message`` with the server's path of an upload replaced by the user's name for it."""
    for where in (str(path), str(path.absolute())):
        message = message.replace(where, name)
    for folder in (str(path.parent), str(path.absolute().parent)):
        if folder not in ("", "."):
            message = message.replace(folder + "/", "")
    return message


def shown_size(
    size: tuple[int, int], max_side: int = DISPLAY_SIDE, min_side: int = DISPLAY_MIN_SIDE
) -> tuple[int, int]:
    """(width, height) of a picture as the page shows it, aspect kept: shrunk to at most
    ``max_side`` pixels, or enlarged to ``min_side`` if smaller.

    Example:
        >>> shown_size((4000, 3000)), shown_size((128, 64)), shown_size((800, 600))
        ((1024, 768), (512, 256), (800, 600))
    """
    return picture_size(size, max_side=max_side, min_side=min_side)


__all__ = [
    "DISPLAY_MIN_SIDE",
    "DISPLAY_SIDE",
    "KEPT_SIDE",
    "MAX_QUERIES",
    "MAX_UPLOAD_BYTES",
    "ExplorerError",
    "ExplorerState",
    "WordExplanation",
    "check_upload",
    "parse_queries",
    "shown_size",
]
