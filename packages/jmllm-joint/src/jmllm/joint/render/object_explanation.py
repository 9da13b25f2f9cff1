"""One object of an image explained as in the paper's user study: J made to name it, GA of the name.

- :func:`object_explanation`: J is asked :data:`OBJECT_QUESTION` and teacher-forced to answer
  :data:`OBJECT_ANSWER` with the object's name; GA explains the name's tokens against the OWL-ViT
  query of the object.
- :func:`object_picture`: that explanation drawn as the box view (the user-study figures) or as
  the map lighting the photo (:mod:`jmllm.joint.render.explanation_pictures`), with no title
  unless one is given: participants must not read the object's name.
- :func:`explain_object`: both in one call, options checked before any GA work.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from jmllm.align.preprocessing import PAPER_PREPROCESSING
from jmllm.joint.chat.templates import PAPER_TEMPLATE
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION
from jmllm.joint.render.explanation_pictures import (
    SHOWN_SCALE,
    box_view_png,
    heatmap_overlay_png,
    map_title,
)
from jmllm.joint.saliency import GAResult

OBJECT_QUESTION = "What's in the image?"
OBJECT_ANSWER = "The image shows a {}"  # the paper's WSOL/user-study setting, teacher-forced
OBJECT_VIEWS = ("box", "overlay")


def object_explanation(
    image: Any,
    object_name: str,
    *,
    model: Any,
    queries: Sequence[str] | None = None,
    question: str = OBJECT_QUESTION,
    ga: Any = None,
    template: str = PAPER_TEMPLATE,
    tokenization: str = PAPER_TOKENIZATION,
    preprocessing: str = PAPER_PREPROCESSING,
) -> tuple[GAResult, Image.Image | None]:
    """J's GA explanation of one object in an image, in the paper's user-study setting, and the
    picture it is drawn on.

    J is asked ``question`` and teacher-forced to answer ``"The image shows a <object_name>"``;
    the explained target is every token of the object name (their logits summed, so multi-word
    names such as ``"traffic light"`` work), against the OWL-ViT query ``a photo of a
    <object_name>`` (or ``queries``).

    Args:
        image: path, PIL image or (3, H, W) uint8 tensor (or a ``JointEmbedding``, or ``t``).
        object_name: the object to explain, e.g. ``"cat"``.
        model: a :class:`~jmllm.joint.JointModel`.
        queries: OWL-ViT queries (default ``[object_name]``).
        question: the question asked before the forced answer.
        ga: a :class:`~jmllm.joint.GradientAlignment` to reuse.
        template: the conversation template, ``"paper"`` (default, the authors' prompt) or
            ``"llava-1.5"``.
        tokenization: how the prompt is tokenised, ``"legacy"`` (default: the authors' ids) or
            ``"checkpoint"`` (:mod:`jmllm.joint.chat.tokenization`).
        preprocessing: how the image is embedded, ``"authors"`` (default: the stored pixels,
            the HF processors' resize) or ``"exif"`` (:mod:`jmllm.align.preprocessing`).

    Returns:
        ``(result, picture)``: the :class:`GAResult` and the RGB image its maps are drawn on
        (None when explained from ``t``).

    Raises:
        GAError: an empty object name, or one the tokeniser cannot give back.

    Example:
        >>> result, picture = object_explanation("q1.png", "cat", model=model)  # doctest: +SKIP
        >>> result.map("class").shape  # doctest: +SKIP
        (375, 500)
    """
    from jmllm.joint.saliency import GAError, GradientAlignment, answer_tokens

    name = " ".join(str(object_name).split())
    if not name:
        raise GAError("object_name: is empty")
    ga = ga or GradientAlignment(model)
    answer = OBJECT_ANSWER.format(name)
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    text, tokens = answer_tokens(model.tokenizer, ids)
    start = text.rfind(name)  # the name ends the answer: its tokens are those ending after start
    positions = [t.position for t in tokens if start >= 0 and t.end > start]
    if not positions:
        raise GAError(
            f"object_name: {name!r} is not recoverable from the tokenised answer {text!r}"
        )
    bare_t = isinstance(image, torch.Tensor) and image.is_floating_point()
    if bare_t or hasattr(image, "image_sizes"):
        source = image
    else:
        source = model.embed(image, preprocessing=preprocessing)
    result = ga.attribute(
        source,
        question,
        target=positions,
        queries=list(queries or [name]),
        answer=answer,
        template=template,
        tokenization=tokenization,
    )
    picture = source.pil_image(0) if not bare_t and getattr(source, "images", None) else None
    return result, picture


def object_picture(
    result: GAResult,
    picture: Image.Image | None,
    view: str = "box",
    weighting: str = "class",
    title: str | None = None,
    box_rule: str = "contrast",
    tokenization: str = PAPER_TOKENIZATION,
    preprocessing: str = PAPER_PREPROCESSING,
) -> Image.Image:
    """The picture of an :func:`object_explanation`: the box view (the paper's user-study
    figures) or the map lighting the photo, with its bar; no title unless one is given (the
    user study's participants must not read the object's name).

    Example:
        >>> object_picture(*object_explanation("q1.png", "cat", model=model))  # doctest: +SKIP
        <PIL.Image.Image image mode=RGB size=512x581>
    """
    from jmllm.joint.saliency import WEIGHTINGS, GAError

    if view not in OBJECT_VIEWS:
        raise GAError(f"view: expected one of {', '.join(OBJECT_VIEWS)}, got {view!r}")
    if weighting not in (*WEIGHTINGS, "gradient"):
        raise GAError(
            f"weighting: expected one of {', '.join(WEIGHTINGS)}, gradient; got {weighting!r}"
        )
    if view == "box":
        png = box_view_png(picture, result, title or "", rule=box_rule)
    else:
        # the bar names the weighting, never the query: participants must not read the object
        png = heatmap_overlay_png(
            picture,
            result.shown(weighting),
            title or "",
            label=f"{map_title(weighting)}; {SHOWN_SCALE}",
        )
    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB")


def explain_object(
    image: Any,
    object_name: str,
    *,
    model: Any,
    view: str = "box",
    weighting: str = "class",
    queries: Sequence[str] | None = None,
    question: str = OBJECT_QUESTION,
    ga: Any = None,
    template: str = PAPER_TEMPLATE,
    title: str | None = None,
    box_rule: str = "contrast",
    tokenization: str = PAPER_TOKENIZATION,
    preprocessing: str = PAPER_PREPROCESSING,
) -> Image.Image:
    """A picture of J's GA explanation of one object in an image (the user study's questions):
    :func:`object_explanation` drawn by :func:`object_picture`.

    Args:
        image: path, PIL image or (3, H, W) uint8 tensor.
        object_name: the object to explain, e.g. ``"cat"``.
        model: a :class:`~jmllm.joint.JointModel`.
        view: ``"box"`` (the box view of the paper's user-study figures) or ``"overlay"``
            (the map lighting the photo, with its bar).
        weighting: map weighting for the overlay (``class``, ``coord``, ``any``, ``gradient``).
        queries: OWL-ViT queries (default ``[object_name]``).
        question: the question asked before the forced answer.
        ga: a :class:`~jmllm.joint.GradientAlignment` to reuse (its OWL norm cache is kept
            between objects of the same image only if the queries are the same).
        template: the conversation template, ``"paper"`` (default: the authors' prompt,
            ``<image>\\nUSER: {question}\\nASSISTANT:``) or ``"llava-1.5"``.
        title: a title drawn above the picture. None (the default) draws none: these pictures
            are shown to user-study participants, who must not read the object's name on them.
        box_rule: the box view's patches: ``"contrast"`` (default: one box per object) or
            ``"authors"`` (every patch at least half-way up GA's own scale, as their figures).
        tokenization, preprocessing: as :func:`object_explanation`.

    Returns:
        The RGB picture.

    Raises:
        GAError: empty object name, unknown view or weighting.

    Example:
        >>> from jmllm.joint import JointModel, explain_object
        >>> model = JointModel.from_pretrained(alignment="w.safetensors")  # doctest: +SKIP
        >>> explain_object("q1.png", "cat", model=model).save("q1_cat.png")  # doctest: +SKIP
    """
    from jmllm.joint.saliency import WEIGHTINGS, GAError

    if view not in OBJECT_VIEWS:  # bad options fail before any GA work
        raise GAError(f"view: expected one of {', '.join(OBJECT_VIEWS)}, got {view!r}")
    if weighting not in (*WEIGHTINGS, "gradient"):
        raise GAError(
            f"weighting: expected one of {', '.join(WEIGHTINGS)}, gradient; got {weighting!r}"
        )
    result, picture = object_explanation(
        image,
        object_name,
        model=model,
        queries=queries,
        question=question,
        ga=ga,
        template=template,
        tokenization=tokenization,
        preprocessing=preprocessing,
    )
    return object_picture(result, picture, view, weighting, title, box_rule)


__all__ = [
    "OBJECT_ANSWER",
    "OBJECT_QUESTION",
    "OBJECT_VIEWS",
    "explain_object",
    "object_explanation",
    "object_picture",
]
