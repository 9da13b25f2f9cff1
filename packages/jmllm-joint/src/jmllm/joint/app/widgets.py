"""What the explorer page's widgets show: map and channel choices, chat text, example images.

- :data:`WEIGHTING_CHOICES`, :data:`METHOD_CHOICES`: the maps a word can be shown with (GA's
  weightings, the other attribution methods); :func:`channel_choices`, :func:`parse_channel`:
  the class channels, as the page offers them and as the explorer takes them.
- :func:`chat_messages`: a conversation as chat messages shown exactly as written (HTML and
  Markdown escaped); :data:`SCROLL_TO_LATEST_JS`: the chat panel scrolled to the latest answer.
- :data:`HALLUCINATION_COLOURS`: the hallucination view's highlight colours.
- :func:`builtin_examples`: the example images (held-out toy-world scenes).
"""

from __future__ import annotations

import html
import os
import re
import tempfile  # noqa: F401 (builtin_examples' doctest uses it)
from collections.abc import Sequence
from pathlib import Path

from jmllm.joint.app.session import ExplorerError
from jmllm.joint.chat.templates import Conversation

# after an answer: the chat panel shows the latest answer whole (its top, when it is taller
# than the panel), not just its last lines
SCROLL_TO_LATEST_JS = """
() => {
  const show = () => {
    for (const id of ["jm-chat", "jm-stock"]) {
      const root = document.getElementById(id);
      const bots = root ? root.querySelectorAll("[data-testid=bot]") : [];
      if (!bots.length) continue;
      const last = bots[bots.length - 1];
      let box = last.parentElement;
      while (box && box !== root && !(box.scrollHeight > box.clientHeight + 1 &&
             /(auto|scroll)/.test(getComputedStyle(box).overflowY))) {
        box = box.parentElement;
      }
      if (!box || box === root) continue;
      const top = last.getBoundingClientRect().top - box.getBoundingClientRect().top
        + box.scrollTop;
      const fits = last.offsetHeight <= box.clientHeight;
      box.scrollTop = fits ? top + last.offsetHeight - box.clientHeight : top - 4;
    }
  };
  for (const wait of [0, 100, 400, 1000]) setTimeout(show, wait);
}
"""
WEIGHTING_CHOICES = (
    ("class", "class"),
    ("coord", "coord"),
    ("any", "any"),
    ("plain gradient (baseline)", "gradient"),
)
# the other attribution methods (jmllm.joint.saliency.attribution), offered beside GA's maps
METHOD_CHOICES = (
    ("gradient × input", "gradient_x_input"),
    ("integrated gradients", "integrated_gradients"),
    ("attention (last layer)", "attention"),
    ("attention rollout", "attention_rollout"),
    ("logit lens", "logit_lens"),
    ("random", "random"),
)
HALLUCINATION_COLOURS = {"detected": "#1a7f37", "not detected": "#cf222e"}


def channel_choices(queries: Sequence[str], objectness: bool = False) -> list[tuple[str, str]]:
    """The class-channel choices of the page: the query the explained word refers to (the
    default), the first query, the maximum over the queries, then each query by name (values
    ``matching``, ``first``, ``max``, ``q<index>``); with ``objectness`` (J's vision side is
    OWLv2) its objectness channel last (``objectness``).

    Example:
        >>> [value for _, value in channel_choices(["cat", "dog"])]
        ['matching', 'first', 'max', 'q0', 'q1']
        >>> channel_choices(["cat"], objectness=True)[-1]
        ('objectness (OWLv2)', 'objectness')
    """
    choices = [
        ("the query the word refers to", "matching"),
        ("first query", "first"),
        ("max over the queries", "max"),
    ]
    choices += [(f"query: {q}", f"q{i}") for i, q in enumerate(queries)]
    return choices + ([("objectness (OWLv2)", "objectness")] if objectness else [])


def parse_channel(value: str | None) -> int | str | None:
    """A class-channel choice as :meth:`~jmllm.joint.app.explorer.Explorer.word_pictures` takes it.

    Example:
        >>> parse_channel("matching"), parse_channel("q2"), parse_channel(None)
        ('matching', 2, None)
    """
    if value is None or value in ("matching", "first", "max", "objectness"):
        return value
    if value.startswith("q") and value[1:].isdigit():
        return int(value[1:])
    raise ExplorerError(f"class channel: unknown choice {value!r}")


def _md(text: str) -> str:
    """``text`` safe inside Markdown: HTML escaped, Markdown punctuation backslash-escaped."""
    # quotes stay as they are: the page shows character references in chat text literally
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", html.escape(text, quote=False))


def chat_messages(conversation: Conversation | None) -> list[dict[str, str]]:
    r"""A conversation as chat messages whose text the page shows exactly as written: HTML
    escaped (model text is shown, never run) and Markdown punctuation escaped.

    Example:
        >>> conv = Conversation().ask("Hi <b>?").answered("*a* <script>")
        >>> for message in chat_messages(conv):
        ...     print(message["role"], message["content"])
        user Hi &lt;b&gt;?
        assistant \*a\* &lt;script&gt;
    """
    messages: list[dict[str, str]] = []
    for turn in conversation.turns if conversation is not None else ():
        messages.append({"role": "user", "content": _md(turn.question)})
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": _md(turn.answer) or "(empty answer)"})
    return messages


# held-out toy scenes the shipped toy J captions exactly, each word's GA map on its object (the
# demo's; three objects; two of one shape, told apart by the language side alone)
TOY_EXAMPLE_SCENES = (114, 26, 93, 38)


def builtin_examples(folder: str | os.PathLike[str]) -> list[Path]:
    """The example images of the page, written into ``folder``: held-out toy-world scenes
    (:mod:`jmllm.joint.toy.scenes`), the images the built-in models know.

    Example:
        >>> [p.name for p in builtin_examples(tempfile.mkdtemp())][:1]
        ['toy-heldout-114.png']
    """
    from jmllm.joint.toy.scenes import make_scene

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in TOY_EXAMPLE_SCENES:
        path = folder / f"toy-heldout-{index}.png"
        make_scene("heldout", index).image.save(path)
        paths.append(path)
    return paths


__all__ = [
    "HALLUCINATION_COLOURS",
    "METHOD_CHOICES",
    "SCROLL_TO_LATEST_JS",
    "TOY_EXAMPLE_SCENES",
    "WEIGHTING_CHOICES",
    "builtin_examples",
    "channel_choices",
    "chat_messages",
    "parse_channel",
]
