"""What the explorer shows of a state, drawn without running the model.

:class:`ExplorerViews` is the base of :class:`~jmllm.joint.app.explorer.Explorer`: the pictures of a
word's GA map and box view and of another method's map at the page's size
(:meth:`~ExplorerViews.word_pictures`, :meth:`~ExplorerViews.method_picture`), their top-patch
tables, the answer's pieces for the hallucination view and its page. None of them touches the
model: they read the state (and the results it holds) only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from jmllm.joint.app.session import ExplorerError, ExplorerState, shown_size
from jmllm.joint.model.joint import JointAnswer, JointEmbedding
from jmllm.joint.saliency import CLASS_QUERY_MODES, WEIGHTINGS, GAResult

MAP_WEIGHTINGS: tuple[str, ...] = (*WEIGHTINGS, "gradient")  # "gradient": the plain baseline


class ExplorerViews:
    """The explorer's pictures, tables and pages of a state: the methods of
    :class:`~jmllm.joint.app.explorer.Explorer` that never run the model."""

    @staticmethod
    def _need_image(state: ExplorerState) -> JointEmbedding:
        if state.emb is None:
            raise ExplorerError("image: upload an image (or choose an example) first")
        return state.emb

    @staticmethod
    def _need_answer(state: ExplorerState) -> JointAnswer:
        answer = state.last_answer
        if answer is None:
            raise ExplorerError("answer: ask J a question first")
        return answer

    def method_picture(self, state: ExplorerState, attribution: Any) -> Image.Image:
        """Another method's map over the image, with its colour bar, at the page's size."""
        from jmllm.joint.render.explanation import overlay_image, with_colour_bar

        image = self._need_image(state).pil_image(0)
        shown = shown_size(attribution.image_size)
        overlay = overlay_image(image, attribution.map(shown), "jet", shown=shown)
        return with_colour_bar(overlay, "jet", f"{attribution.method} score (min–max normalised)")

    @staticmethod
    def method_top_patches(attribution: Any, top: int = 5) -> tuple[list[str], list[list[Any]]]:
        """Headers and rows of the patches with the largest scores of another method's map."""
        scores = attribution.scores.float()
        order = np.argsort(-scores.numpy(), kind="stable")[:top]
        side = round(len(scores) ** 0.5)
        rows = [[int(k), f"({k // side}, {k % side})", round(float(scores[k]), 4)] for k in order]
        return ["patch", "row, col", f"{attribution.method} score"], rows

    def word_pictures(
        self,
        state: ExplorerState,
        result: GAResult,
        weighting: str = "class",
        channel: int | str | None = None,
    ) -> tuple[Image.Image, Image.Image]:
        """The GA map over the image and the box view of a result, each with its colour bar, at
        the page's size: the pictures of the explanation report without their matplotlib frame
        (drawing a figure costs more than the GA of a word with cached norms).

        Args:
            state: the current state (its image is drawn on).
            result: a word's GA result.
            weighting: ``class``, ``coord``, ``any`` or ``gradient`` (the plain-gradient map).
            channel: the class channel of the ``class`` map and of the box view's thickness:
                ``"matching"`` (the query the word refers to), ``"first"``, ``"max"`` over the
                queries, or a query's index;
                None: the result's own (:class:`~jmllm.joint.GradientAlignment`'s default).

        Example:
            >>> overlay, boxes = explorer.word_pictures(state, view.result, "coord")  # doctest: +SKIP
        """
        from jmllm.joint.render.drawing import SPOTLIGHT
        from jmllm.joint.render.explanation import (
            BOX_VIEW_BAR,
            box_view_image,
            overlay_image,
            result_title,
            with_colour_bar,
        )

        if weighting not in MAP_WEIGHTINGS:
            raise ExplorerError(
                f"weighting: {weighting!r} is not one of {', '.join(MAP_WEIGHTINGS)}"
            )
        channel = self._check_channel(result, channel)
        image = self._need_image(state).pil_image(0)
        shown = shown_size(result.image_size)
        # painted at the page's size: a full-resolution map of a large photo is not kept
        saliency = result.shown(weighting, query=channel, size=shown)
        overlay = overlay_image(image, saliency, SPOTLIGHT, shown=shown)
        boxes = box_view_image(image, result, query=channel, cmap="viridis", shown=shown)
        title = result_title(result, weighting, channel)
        return (
            with_colour_bar(overlay, SPOTLIGHT, title),
            with_colour_bar(boxes, "viridis", BOX_VIEW_BAR),
        )

    @staticmethod
    def _check_channel(result: GAResult, channel: int | str | None) -> int | str | None:
        if channel is None or channel in CLASS_QUERY_MODES:
            return channel
        if isinstance(channel, int) and not isinstance(channel, bool):
            if 0 <= channel < result.num_queries:
                return channel
        raise ExplorerError(
            f"class channel: {channel!r} is neither {', '.join(map(repr, CLASS_QUERY_MODES))} "
            "nor a query index "
            f"(0..{result.num_queries - 1})"
        )

    @classmethod
    def top_patches(
        cls,
        result: GAResult,
        weighting: str = "class",
        top: int = 5,
        channel: int | str | None = None,
    ) -> tuple[list[str], list[list[Any]]]:
        """Headers and rows of the patches with the largest weights (as the report's table)."""
        if weighting == "gradient":
            weights = result.patch_gradient_norms.float()
            weights = weights / weights.max().clamp(min=1e-30)
        else:
            weights = result.weights(weighting, cls._check_channel(result, channel))
        order = np.argsort(-weights.numpy(), kind="stable")[:top]
        side = round(len(weights) ** 0.5)
        headers = ["patch", "row, col", f"{weighting} weight", "box (px)"]
        headers += [f"cos {c}" for c in result.channels]
        rows = [
            [
                int(k),
                f"({k // side}, {k % side})",
                round(float(weights[k]), 3),
                str(result.boxes_xyxy[k].tolist()),
                *(round(float(s), 3) for s in result.similarities[k]),
            ]
            for k in order
        ]
        return headers, rows

    @staticmethod
    def hallucination_segments(report: Any) -> list[tuple[str, str | None]]:
        """The answer as (text, label) pieces: ``detected`` / ``not detected`` on the object
        words, None elsewhere (for a highlighted-text view)."""
        pieces: list[tuple[str, str | None]] = []
        cursor = 0
        for m in report.mentions:
            if m.start < cursor:
                continue
            if m.start > cursor:
                pieces.append((report.answer_text[cursor : m.start], None))
            label = "detected" if report.objects[m.name].detected else "not detected"
            pieces.append((report.answer_text[m.start : m.end], label))
            cursor = m.end
        if cursor < len(report.answer_text):
            pieces.append((report.answer_text[cursor:], None))
        return pieces

    @staticmethod
    def hallucination_html(state: ExplorerState) -> str | None:
        """The hallucination page (as ``jmllm-joint hallucinations`` writes it), once checked."""
        from jmllm.joint.hallucination.page import render_hallucination_report

        if state.hallucination is None:
            return None
        return render_hallucination_report(state.hallucination)


__all__ = ["MAP_WEIGHTINGS", "ExplorerViews"]
