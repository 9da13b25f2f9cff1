"""GA's results: one explained target's maps (:class:`GAResult`), a whole answer's (:class:`AnswerExplanation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING
from jmllm.joint.chat.templates import INTERACTIVE_TEMPLATE
from jmllm.joint.chat.tokenization import INTERACTIVE_TOKENIZATION
from jmllm.joint.saliency.answers import AnswerToken, AnswerWord, QueryMatch
from jmllm.joint.saliency.gradients import BOX_CHANNELS, OBJECTNESS_CHANNEL, minmax
from jmllm.joint.saliency.maps import (
    WEIGHTINGS,
    box_pixels,
    paint_boxes,
    patch_grid_map,
    patch_weights,
)


@dataclass
class GAResult:
    """Gradient Alignment of one explained target (a token, or a word's tokens summed).

    Attributes:
        tokens: the explained answer token(s); a multi-token word lists all of its tokens.
        target: what was asked for (the word, or ``"#<position>"``).
        queries: the Q text queries (class channels, in order).
        channels: channel names, ``queries + ["cx", "cy", "w", "h"]`` (OWLv2: then
            ``"objectness"``, and every (N, Q + 4) table below is (N, Q + 5)).
        similarities: (N, Q + 4) cosine ``s_{k,c}``.
        normalised: (N, Q + 4) class channels min–max normalised together, box channels together.
        numerators: (N, Q + 4) ``⟨g_{k,c}, g_L⟩``; norms: (N, Q + 4) ``‖g_{k,c}‖``.
        g_llm_norm: ``‖g_L‖``.
        boxes: (N, 4) OWL-ViT boxes ``cx, cy, w, h`` in [0, 1] of the image (OWLv2's mapped
            back from its padded square); boxes_xyxy: (N, 4) pixel ints.
        class_scores: (N, Q) sigmoid detection scores for the queries.
        patch_gradient_norms: (N,) per-patch ‖g_L‖ (rows of ``t`` without CLS), the
            plain-gradient baseline.
        image_size: (width, height) of the maps.
        maps: (property) weighting → (H, W) float32 map at the original image resolution, in
            [0, 1]: ``class``, ``coord``, ``any`` and ``gradient`` (the baseline painted on each
            patch's grid cell). Painted on first access.
        answer_text: the decoded answer the token(s) come from.
        class_query: which class channel the ``class`` map uses with several queries:
            ``"matching"`` (the default: the query naming the object the explained word refers
            to, see :func:`matching_query`), ``"first"`` (the letter of the authors' one-query
            scripts), ``"max"`` or ``"objectness"`` (OWLv2's objectness channel, whatever the
            queries). The first three agree when there is one query.
        class_match: what ``"matching"`` picked for this result (:class:`QueryMatch`: the
            query's index, or None for the maximum over the queries, and the rule that chose).
        box_rounding: how box corners became pixels (``"truncate"``, the authors', or
            ``"outward"``; see :func:`box_pixels`).
    """

    tokens: list[AnswerToken]
    target: str
    queries: list[str]
    similarities: torch.Tensor
    normalised: torch.Tensor
    numerators: torch.Tensor
    norms: torch.Tensor
    g_llm_norm: float
    boxes: torch.Tensor
    boxes_xyxy: np.ndarray
    class_scores: torch.Tensor
    patch_gradient_norms: torch.Tensor
    image_size: tuple[int, int]
    answer_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    class_query: str = "matching"
    box_rounding: str = "truncate"
    class_match: QueryMatch = field(default_factory=lambda: QueryMatch(0, "only query"))
    pads_to_square: bool = False  # OWLv2: the patch grid covers the image padded to a square
    _maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def maps(self) -> dict[str, np.ndarray]:
        for w in (*WEIGHTINGS, "gradient"):
            self.map(w)
        return self._maps

    @property
    def channels(self) -> list[str]:
        """Channel names: the queries, ``cx, cy, w, h`` and, with OWLv2, ``objectness``."""
        extra = [OBJECTNESS_CHANNEL] if self.similarities.shape[-1] > self.num_queries + 4 else []
        return [*self.queries, *BOX_CHANNELS, *extra]

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def weights(self, weighting: str = "class", query: int | str | None = None) -> torch.Tensor:
        """Per-patch weights (N,) of a weighting: ``class``, ``coord``, ``any`` (box weights, see
        :func:`patch_weights`; ``query`` None uses the result's ``class_query``) or ``gradient``
        (the plain-gradient baseline, min–max normalised per-patch ‖∂ logit / ∂ t‖)."""
        if weighting == "gradient":
            return minmax(self.patch_gradient_norms.float())
        return patch_weights(self.normalised, self.num_queries, weighting, self.channel(query))

    def channel(self, query: int | str | None = None) -> int | str:
        """The ``class`` map's channel as :func:`patch_weights` takes it: a query index or
        ``"max"`` (``query`` None: the result's ``class_query``; ``"matching"`` resolved to what
        :attr:`class_match` picked).

        Example:
            >>> result.channel(), result.channel("max")  # doctest: +SKIP
            (2, 'max')
        """
        chosen = self.class_query if query is None else query
        if chosen == "matching":
            return "max" if self.class_match.index is None else self.class_match.index
        if chosen == "first":
            return 0
        return chosen

    def map(
        self,
        weighting: str = "class",
        query: int | str | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The (H, W) map of a weighting (or ``"gradient"``, the baseline).

        The maps of the result's own settings are painted on first use and kept (only the
        weightings asked for are painted: at a camera photo's resolution each is large).

        Args:
            weighting: ``class``, ``coord``, ``any`` or ``gradient``.
            query: for ``class``: a query index, ``"matching"``, ``"first"`` or ``"max"``
                (default: the result's ``class_query``).
            size: (width, height) to paint at instead of the image's own size, e.g. (224, 224)
                for the authors' CUB pipeline (boxes scaled to that size, then rounded).
        """
        if size is None and query is None:
            if weighting not in self._maps:
                if weighting == "gradient":
                    self._maps[weighting] = patch_grid_map(
                        self.patch_gradient_norms, self.image_size, self.pads_to_square
                    )
                else:
                    self._maps[weighting] = paint_boxes(
                        self.weights(weighting), self.boxes_xyxy, self.image_size
                    )
            return self._maps[weighting]
        if weighting == "gradient":
            size = size or self.image_size
            return patch_grid_map(self.patch_gradient_norms, size, self.pads_to_square)
        if size is None:
            return paint_boxes(self.weights(weighting, query), self.boxes_xyxy, self.image_size)
        boxes = box_pixels(self.boxes, size, self.box_rounding)
        return paint_boxes(self.weights(weighting, query), boxes, size)

    def shown_weights(
        self, weighting: str = "class", query: int | str | None = None
    ) -> torch.Tensor:
        """Per-patch weights (N,) as the pictures show them: :meth:`weights` rescaled so that 0 is
        the median patch's weight and 1 the top patch's (clipped; all zeros when every patch
        weighs the same). Most patches of a scene are background, and GA's own min–max puts a
        flat background half-way up; this contrast lets the object a word refers to stand out.
        A monotone rescaling: the peak and the ranking are :meth:`weights`'.

        Example:
            >>> result.shown_weights("class").max()  # doctest: +SKIP
            tensor(1.)
        """
        values = self.weights(weighting, query).float()
        low, high = values.median(), values.max()
        if not bool(high > low):
            return torch.zeros_like(values)
        return ((values - low) / (high - low)).clamp(0.0, 1.0)

    def shown(
        self,
        weighting: str = "class",
        query: int | str | None = None,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """The (H, W) map as the pictures show it: every patch paints its box with its
        :meth:`shown_weights` (``gradient``: its grid cell), the pixel-wise maximum, 0 where no
        box reaches. The same painting as :meth:`map`, so a pixel's value is the shown weight of
        the patch :meth:`map` takes it from.

        Args:
            weighting, query, size: as :meth:`map`.

        Example:
            >>> result.shown("class").shape == result.map("class").shape  # doctest: +SKIP
            True
        """
        values = self.shown_weights(weighting, query)
        size = size or self.image_size
        if weighting == "gradient":
            return patch_grid_map(values, size, self.pads_to_square)
        boxes = (
            self.boxes_xyxy
            if size == self.image_size
            else box_pixels(self.boxes, size, self.box_rounding)
        )
        return paint_boxes(values, boxes, size)


@dataclass
class AnswerExplanation:
    """GA for a whole answer: one :class:`GAResult` per token and per word.

    Attributes:
        prompt: the question; answer_text: the decoded answer.
        tokens / token_results: every answer token and its result (same order).
        words / word_results: every word (multi-token words: summed logits) and its result.
        queries: the OWL-ViT queries; image: the RGB image (None when explained from ``t``);
        image_size: (width, height) of the maps.
        template: the conversation template of the prompt (a ``JointAnswer``'s own when one was
            explained).
        tokenization: how the prompt was tokenised (likewise).
        preprocessing: how the image was embedded (None when explained from ``t``).
    """

    prompt: str
    answer_text: str
    tokens: list[AnswerToken]
    words: list[AnswerWord]
    token_results: list[GAResult]
    word_results: list[GAResult]
    queries: list[str]
    image: Any
    image_size: tuple[int, int]
    template: str = INTERACTIVE_TEMPLATE
    tokenization: str = INTERACTIVE_TOKENIZATION
    preprocessing: str | None = INTERACTIVE_PREPROCESSING
