"""The interactive explorer's work, without any user interface (DESIGN §1.9).

``jmllm-joint app`` (:mod:`jmllm.joint.app`) is a thin Gradio page over the steps here, so every
step is a plain function, tested without a browser:

- :meth:`Explorer.open_image`: an uploaded file becomes an
  :class:`~jmllm.joint.app.session.ExplorerState` holding J's
  embedding ``t`` and a copy of the image at the page's size (upload size and pixel count
  checked before any pixel is decoded; the full-resolution upload is not kept), and the model's
  warning about the image, if it has one (the toy world's, for a photo);
- :meth:`Explorer.reset_chat`: a new conversation about the same image;
- :meth:`Explorer.ask`: one chat turn of J, and of stock LLaVA beside it when asked;
- :meth:`Explorer.detect`: O^OWL for the queries the user typed, or else for the object words
  of the last answer;
- :meth:`Explorer.explain_word`: the GA explanation of a word of the last answer. The OWL-side
  gradient norms depend on the (image, queries) only, so they are computed on the first click and
  kept (:class:`~jmllm.joint.GradientAlignment` with a cache of several pairs); every further
  click costs one teacher-forced LLM forward and backward plus one JVP;
- :meth:`Explorer.explain_word_with`: the same word explained by another attribution method
  (:mod:`jmllm.joint.saliency.attribution`: gradient × input, integrated gradients, attention, rollout,
  logit lens, random);
- :meth:`Explorer.hallucinations`: the hallucination view of the last answer;
- :meth:`Explorer.report_html` (and the explanation and hallucination pages): the very pages the
  command line writes, for the current state.

One :class:`Explorer` holds the one loaded J and a lock, so the model serves one request at a time
whoever calls it (two browser tabs, the HTTP API, a script). Everything that belongs to one user
lives in an :class:`~jmllm.joint.app.session.ExplorerState`, which is never changed in place: each
step returns a new one.

The steps that run the model are here; what one user holds and the checks on what they send
(uploads, typed queries) are :mod:`jmllm.joint.app.session`'s, and the pictures, tables and pages
drawn from a state without the model are :mod:`jmllm.joint.app.views`' (the base class of
:class:`Explorer`). Their names are importable from here too.

Example:
    >>> from jmllm.joint.app.explorer import Explorer
    >>> explorer = Explorer(model)  # doctest: +SKIP
    >>> state = explorer.open_image("cat.jpg")  # doctest: +SKIP
    >>> state = explorer.ask(state, "What's in the image?")  # doctest: +SKIP
    >>> state = explorer.set_queries(state, "cat, dog")  # doctest: +SKIP
    >>> state, view = explorer.explain_word(state, 0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from jmllm.align.images import MAX_IMAGE_PIXELS, ImageLoadError, open_image
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.joint.app.session import DISPLAY_MIN_SIDE as DISPLAY_MIN_SIDE
from jmllm.joint.app.session import (
    DISPLAY_SIDE,
    KEPT_SIDE,
    MAX_UPLOAD_BYTES,
    ExplorerError,
    ExplorerState,
    WordExplanation,
    _named,
    check_upload,
    parse_queries,
)
from jmllm.joint.app.session import MAX_QUERIES as MAX_QUERIES
from jmllm.joint.app.session import shown_size as shown_size
from jmllm.joint.app.views import MAP_WEIGHTINGS, ExplorerViews
from jmllm.joint.chat.templates import (
    INTERACTIVE_TEMPLATE,
    Conversation,
    check_question,
    get_template,
)
from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION, check_tokenization
from jmllm.joint.detection.heads import DEFAULT_NMS_IOU, Detections
from jmllm.joint.model.joint import DEFAULT_QUERY_TEMPLATE
from jmllm.joint.model.joint import JointAnswer as JointAnswer
from jmllm.joint.model.joint import JointEmbedding as JointEmbedding
from jmllm.joint.render.drawing import MIN_SIDE as MIN_SIDE
from jmllm.joint.render.drawing import fit_picture
from jmllm.joint.render.drawing import picture_size as picture_size
from jmllm.joint.saliency import CLASS_QUERY_MODES as CLASS_QUERY_MODES
from jmllm.joint.saliency import WEIGHTINGS as WEIGHTINGS
from jmllm.joint.saliency import (
    AnswerWord,
    GradientAlignment,
    answer_tokens,
    answer_words,
)
from jmllm.joint.saliency import GAResult as GAResult

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 512  # the largest answer a chat turn may ask for
NORM_CACHE_SIZE = 16  # (image, queries) pairs whose GA norms are kept
# The other attribution methods a word can be explained with (jmllm.joint.saliency.attribution); GA's
# weightings and the plain gradient come from the GA result itself.
OTHER_METHODS: tuple[str, ...] = (
    "gradient_x_input",
    "integrated_gradients",
    "attention",
    "attention_rollout",
    "logit_lens",
    "random",
)
DETECTION_NMS_IOU = DEFAULT_NMS_IOU  # the command line's default, so reports match


class Explorer(ExplorerViews):
    """The explorer's steps over one loaded J, one request at a time.

    Args:
        model: a :class:`~jmllm.joint.JointModel`.
        objects: the vocabulary in which the object words of an answer are looked up (default
            the 80 COCO names of :mod:`jmllm.joint.hallucination`).
        max_pixels: largest accepted image (pixels, checked from the file's header).
        max_bytes: largest accepted file.
        max_boxes: detections drawn and listed.
        cache_size: (image, queries) pairs whose GA gradient norms are kept.
        tokenization: how questions are tokenised (``"checkpoint"``, default, or ``"legacy"``:
            the authors' ids; :mod:`jmllm.joint.chat.tokenization`).
        preprocessing: how images are embedded (``"exif"``, default, or ``"authors"``;
            :mod:`jmllm.align.preprocessing`).

    Example:
        >>> explorer = Explorer(model)  # doctest: +SKIP
        >>> state = explorer.ask(explorer.open_image("cat.jpg"), "What's in the image?")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        objects: Sequence[str] | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        max_bytes: int = MAX_UPLOAD_BYTES,
        max_boxes: int = 20,
        cache_size: int = NORM_CACHE_SIZE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> None:
        if max_pixels < 1 or max_bytes < 1 or max_boxes < 1:
            raise ValueError("max_pixels, max_bytes and max_boxes must be positive")
        self.tokenization = check_tokenization(tokenization)
        self.preprocessing = get_preprocessing(preprocessing)
        self.model = model
        self.objects = list(objects) if objects else None
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.max_boxes = max_boxes
        self.ga = GradientAlignment(model, cache_size=cache_size)
        # One request at a time on the model: generation, GA's caches and autograd are not
        # meant to be shared by two threads.
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ image
    def open_image(self, path: str | Path, name: str | None = None) -> ExplorerState:
        """A fresh state for an image file, under the project's image policy: the file's size,
        then its pixel count from the header (:attr:`max_pixels`), before any pixel is decoded;
        decoded once, to a copy of at most :data:`~jmllm.joint.app.session.KEPT_SIDE` pixels
        (the upload itself is not kept), embedded once. The model's warning about the image (its
        ``input_check``, e.g. the toy world's for a photo) is kept as the state's
        :attr:`~jmllm.joint.app.session.ExplorerState.notice`.

        Args:
            path: the file (a server's upload folder, for the page).
            name: the file's name as the user knows it (default: its file name); every message
                names the file so, never by ``path``.

        Raises:
            ExplorerError: missing, unreadable, too large (bytes or pixels); one sentence
                naming the file by ``name``.
        """
        path = Path(path)
        name = name or path.name
        check_upload(path, name, self.max_bytes)
        try:
            loaded = open_image(
                path,
                max_side=KEPT_SIDE,
                max_pixels=self.max_pixels,
                name=name,
                exif_orientation=self.preprocessing.exif_orientation,
            )
        except ImageLoadError as exc:
            raise ExplorerError(_named(str(exc), path, name)) from None
        with self.lock:
            emb = self.model.embed([loaded], preprocessing=self.preprocessing.name)
        # the model's check ran as the image was embedded (JointEmbedding.input_problems)
        notice = (emb.input_problems or [None])[0] or ""
        return ExplorerState(image_name=name, emb=emb, notice=notice)

    @staticmethod
    def reset_chat(state: ExplorerState) -> ExplorerState:
        """A new conversation about the same image: the answers, their explanations and the
        hallucination view are dropped; the image, its embedding, the typed queries and the
        threshold stay (and the GA norms stay cached)."""
        return dataclasses.replace(
            state, conversation=Conversation(), stock=None, explained={}, hallucination=None
        )

    @property
    def max_new_tokens(self) -> int:
        """The longest answer a chat turn may ask for: what the language model's positions leave
        after the image tokens and a first question (at most :data:`MAX_NEW_TOKENS`); later
        turns have less, and a turn that does not fit is refused with a message."""
        llava = getattr(self.model, "llava", None)
        if llava is None:
            return MAX_NEW_TOKENS
        positions = int(llava.config.text_config.max_position_embeddings)
        prompt = self.model.prompt_inputs(["What's in the image?"], INTERACTIVE_TEMPLATE)
        room = positions - int(prompt["input_ids"].shape[1])
        return max(1, min(MAX_NEW_TOKENS, room))

    # ------------------------------------------------------------------ chat
    def ask(
        self,
        state: ExplorerState,
        question: str,
        *,
        compare: bool = False,
        template: str = INTERACTIVE_TEMPLATE,
        max_new_tokens: int = 64,
    ) -> ExplorerState:
        """One chat turn: J answers ``question`` after the conversation so far.

        With ``compare``, stock LLaVA (its own vision tower) answers the same questions in its
        own conversation; turned on late, it first answers the earlier questions, so its turns
        always line up with J's.

        Args:
            state: the current state (an image must be open).
            question: the user's question.
            compare: also answer with stock LLaVA.
            template: conversation template (``llava-1.5`` or ``paper``).
            max_new_tokens: answer length limit (1 to :attr:`max_new_tokens`).

        Returns:
            The new state; explanations of the previous answer are dropped.
        """
        emb = self._need_image(state)
        question = check_question(question, "question")
        get_template(template)
        limit = self.max_new_tokens
        if not 1 <= int(max_new_tokens) <= limit:
            raise ExplorerError(f"max_new_tokens: must be in 1..{limit}, got {max_new_tokens}")
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "template": template,
            "tokenization": self.tokenization,
        }
        with self.lock:
            conversation = self.model.chat(emb, question, history=state.conversation, **kwargs)
            stock = state.stock
            if compare:
                stock = stock or Conversation()
                for turn in conversation.turns[len(stock.turns) :]:
                    stock = self.model.chat(
                        emb, turn.question, history=stock, vision="llava", **kwargs
                    )
        return dataclasses.replace(
            state,
            conversation=conversation,
            stock=stock,
            explained={},
            attributions={},
            hallucination=None,
        )

    # ------------------------------------------------------------------ detection
    def set_queries(self, state: ExplorerState, text: str | Sequence[str] | None) -> ExplorerState:
        """The state with the user's typed queries (empty: the object words of the answer)."""
        queries = parse_queries(text)
        if queries == state.typed_queries:
            return state
        return dataclasses.replace(state, typed_queries=queries, explained={})

    @staticmethod
    def set_threshold(state: ExplorerState, threshold: float) -> ExplorerState:
        """The state with another detection score threshold, in (0, 1)."""
        threshold = float(threshold)
        if not 0.0 < threshold < 1.0:
            raise ExplorerError(f"threshold: must be in (0, 1), got {threshold}")
        return dataclasses.replace(state, threshold=threshold)

    def object_words(self, state: ExplorerState) -> tuple[str, ...]:
        """The object names the last answer mentions (from :attr:`objects`)."""
        from jmllm.joint.hallucination.check import object_mentions

        answer = state.last_answer
        if answer is None:
            return ()
        return tuple(dict.fromkeys(m.name for m in object_mentions(answer.text, self.objects)))

    def queries(self, state: ExplorerState) -> tuple[str, ...]:
        """The queries in effect: the typed ones, else the object words of the last answer."""
        return state.typed_queries or self.object_words(state)

    def detect(self, state: ExplorerState) -> Detections | None:
        """O^OWL for the queries in effect, or None when there is none."""
        emb = self._need_image(state)
        queries = self.queries(state)
        if not queries:
            return None
        with self.lock:
            return self.model.detect(
                emb,
                list(queries),
                threshold=state.threshold,
                nms_iou=DETECTION_NMS_IOU,
                template=DEFAULT_QUERY_TEMPLATE,
            )[0]

    def detections_picture(
        self, state: ExplorerState, detections: Detections | None
    ) -> Image.Image:
        """The image with the detections drawn, at most
        :data:`~jmllm.joint.app.session.DISPLAY_SIDE` pixels."""
        from jmllm.joint.render.report import draw_detections

        image = self._need_image(state).pil_image(0)
        if detections is None:
            return fit_picture(image, max_side=DISPLAY_SIDE)
        # the shared drawing rules: enlarged when small, labels legible and never overlapping
        return draw_detections(image, detections, max_boxes=self.max_boxes, max_side=DISPLAY_SIDE)

    # ------------------------------------------------------------------ GA
    def words(self, state: ExplorerState) -> list[AnswerWord]:
        """The words of the last answer (what the page shows as clickable chips)."""
        answer = state.last_answer
        if answer is None:
            return []
        text, tokens = answer_tokens(self.model.tokenizer, answer.token_ids)
        return answer_words(text, tokens)

    def explain_word(
        self,
        state: ExplorerState,
        index: int,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[ExplorerState, WordExplanation]:
        """GA of word ``index`` of the last answer, against the queries in effect.

        With no query in effect, the word itself is the query. The gradient norms of the
        (image, queries) come from the cache after the first click.

        Args:
            state: the current state.
            index: the word's index in :meth:`words`.
            progress: called with a short description before the work starts.

        Returns:
            The new state (holding the result) and the :class:`WordExplanation`.

        Example:
            >>> state, view = explorer.explain_word(state, 2)  # doctest: +SKIP
            >>> view.result.map("class").shape  # doctest: +SKIP
        """
        emb = self._need_image(state)
        answer = self._need_answer(state)
        words = self.words(state)
        if not isinstance(index, int) or not 0 <= index < len(words):
            raise ExplorerError(
                f"word: index {index!r} is not a word of the answer ({len(words)} words)"
            )
        word = words[index]
        # the word by its text and occurrence, as GradientAlignment labels words
        occurrence = sum(w.text.casefold() == word.text.casefold() for w in words[:index])
        queries = self.queries(state) or (word.text,)
        key = (index, queries)
        known = state.explained.get(key)
        if known is not None:
            return state, WordExplanation(index, word, queries, known, True, True, 0.0)
        with self.lock:
            cached = self.ga.has_norms(emb, queries)
            if progress is not None:
                progress(
                    f"GA of {word.text!r}: one backward + one JVP"
                    if cached
                    else f"GA of {word.text!r}: gradient norms of this image and these queries "
                    "(once), then one backward + one JVP"
                )
            start = time.perf_counter()
            result = self.ga.attribute(
                emb,
                state.last_question,
                word.text,
                list(queries),
                answer=answer,
                occurrence=occurrence,
            )
            seconds = time.perf_counter() - start
        explained = {**state.explained, key: result}
        view = WordExplanation(index, word, queries, result, cached, False, seconds)
        return dataclasses.replace(state, explained=explained), view

    def explain_word_with(
        self,
        state: ExplorerState,
        index: int,
        method: str,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[ExplorerState, Any, float]:
        """Word ``index`` of the last answer explained by another attribution method
        (:data:`OTHER_METHODS`, :mod:`jmllm.joint.saliency.attribution`): the same target GA explains
        (the word's tokens, their logits summed), a map over ``t``'s patch grid.

        Returns:
            The new state (holding the map), the
            :class:`~jmllm.joint.saliency.attribution.Attribution` and the seconds it took (0 when the
            state already held it).

        Example:
            >>> state, attribution, seconds = explorer.explain_word_with(state, 2, "logit_lens")  # doctest: +SKIP
        """
        from jmllm.joint.saliency.attribution import get_method, prepare_request

        if method not in OTHER_METHODS:
            raise ExplorerError(f"method: {method!r} is not one of {', '.join(OTHER_METHODS)}")
        emb = self._need_image(state)
        answer = self._need_answer(state)
        words = self.words(state)
        if not isinstance(index, int) or not 0 <= index < len(words):
            raise ExplorerError(
                f"word: index {index!r} is not a word of the answer ({len(words)} words)"
            )
        known = state.attributions.get((index, method))
        if known is not None:
            return state, known, 0.0
        word = words[index]
        with self.lock:
            if progress is not None:
                progress(f"{method} of {word.text!r}")
            start = time.perf_counter()
            request = prepare_request(
                self.model, emb, state.last_question, list(word.positions), answer
            )
            attribution = get_method(method, self.model).attribute_request(request)
            seconds = time.perf_counter() - start
        attributions = {**state.attributions, (index, method): attribution}
        return dataclasses.replace(state, attributions=attributions), attribution, seconds

    # ------------------------------------------------------------------ hallucination view
    def hallucinations(self, state: ExplorerState) -> ExplorerState:
        """The state with the hallucination view of the last answer: its object words checked
        against O^OWL's scores on the same ``t`` (typed queries added as extra objects)."""
        from jmllm.joint.hallucination.check import check_hallucinations

        emb = self._need_image(state)
        answer = self._need_answer(state)
        with self.lock:
            report = check_hallucinations(
                self.model,
                emb,
                state.last_question,
                answer=answer,
                objects=self.objects,
                extra_queries=state.typed_queries,
                threshold=state.threshold,
                ga=self.ga,
            )
        return dataclasses.replace(state, hallucination=report)

    # ------------------------------------------------------------------ reports
    def report_html(self, state: ExplorerState) -> str:
        """The page ``jmllm-joint chat IMAGE -p … [--compare] -q … --out DIR`` writes as
        ``report.html``, for the current state (image, conversation, stock answers, detections).
        """
        from jmllm.joint.render.report import render_report_html

        emb = self._need_image(state)
        return render_report_html(
            emb.pil_image(0),
            conversation=state.conversation if state.conversation.turns else None,
            stock=state.stock,
            detections=self.detect(state),
            notes=self._notes(state),
            sources=self.model.sources,
            max_boxes=self.max_boxes,
        )

    @staticmethod
    def _notes(state: ExplorerState) -> list[str]:
        """What a downloaded page must say at its top, as the command line's pages do: the
        model's warning about the image (a photo given to the toy world)."""
        return [state.notice] if state.notice else []

    def explanation_html(
        self,
        state: ExplorerState,
        weighting: str = "class",
        channel: int | str | None = None,
    ) -> str | None:
        """The GA explanation page (as ``jmllm-joint explain`` writes it) of the words of the
        last answer explained so far, in answer order, drawn as the page shows them (the same
        ``weighting`` and class ``channel``, see :meth:`word_pictures`); None when there is
        none."""
        from jmllm.joint.render.explanation import render_explanation_report

        emb = self._need_image(state)
        answer = state.last_answer
        if answer is None or not state.explained:
            return None
        by_word = {index: result for (index, _), result in state.explained.items()}
        results = [by_word[index] for index in sorted(by_word)]
        text, _ = answer_tokens(self.model.tokenizer, answer.token_ids)
        return render_explanation_report(
            emb.pil_image(0),
            state.last_question,
            text,
            results,
            weighting=weighting,
            title="GA explanation of J's answer",
            query=self._check_channel(results[0], channel),
            notes=self._notes(state),
        )


__all__ = [
    "KEPT_SIDE",
    "MAP_WEIGHTINGS",
    "MAX_IMAGE_PIXELS",
    "OTHER_METHODS",
    "Explorer",
    "ExplorerError",
    "ExplorerState",
    "WordExplanation",
    "check_upload",
    "parse_queries",
]
