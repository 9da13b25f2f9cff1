"""The pictures of an explanation and their legends: the map lighting the photo, the box view.

- :func:`heatmap_overlay_png`: the map lighting the photo
  (:func:`jmllm.joint.render.drawing.spotlight`: the photo's own colours where the map is high,
  dimmed where it is low, a white line at half height), at the contrast of
  :meth:`GAResult.shown` (0: the median patch, 1: the top patch), with a bar titled by what it
  shows: the weighting and the class channel it used.
- :func:`box_view_png`: the paper's box view — the patches whose shown class weight reaches a
  threshold draw their predicted boxes (one per object: boxes overlapping a heavier one are
  left out, at most :data:`BOX_VIEW_MAX` of them) with thickness ∝ class weight and colour =
  box-coordinate weight, plus a red line from the patch's grid cell to its box centre.
- :func:`map_title`, :func:`result_title`: the legends that say what a map shows (its weighting,
  its class channel and how that was chosen, the contrast it is shown at).

Every picture follows :mod:`jmllm.joint.render.drawing` (sizes, fonts, colours, the overlay rule);
the report pages that show them are :mod:`jmllm.joint.render.explanation`'s.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from jmllm.joint.render.drawing import (
    OVERLAY_ALPHA,
    SPOTLIGHT,
    blend_map,
    figure,
    fit_picture,
    spotlight,
)
from jmllm.joint.render.report import png_bytes
from jmllm.joint.saliency import GAResult
from jmllm.joint.saliency.maps import _check_choice

MAX_SIDE = 768  # pictures are drawn at most this large (maps keep their full resolution)
BOX_VIEW_BAR = "box colour: box-coordinate weight (thickness: class weight)"
BOX_VIEW_MAX = 5  # boxes drawn at most in a box view
# Which patches a box view draws: "contrast" (the default: at least half-way up the shown
# contrast, one box per object, at most BOX_VIEW_MAX) or "authors" (their grad_heatmap.py:
# every patch whose normalised class weight reaches the threshold)
BOX_RULES = ("contrast", "authors")
BOX_VIEW_OVERLAP = 0.5  # a box overlapping a heavier drawn one this much (IoU) is left out
SHOWN_SCALE = "0: median patch, 1: top patch"  # the contrast of every picture of a map
BOX_VIEW_CAPTION = (
    f"Box view: the predicted boxes of the patches whose class weight is at least half the top "
    f"weight ({SHOWN_SCALE}), one per object (a box overlapping a heavier one is left out), at "
    f"most {BOX_VIEW_MAX}; thickness: class weight; colour: box-coordinate weight; red line: "
    "from the patch to its box's centre."
)
MAP_TITLES = {
    "class": "GA class weight",
    "coord": "GA box-coordinate weight",
    "any": "GA weight, class or box (maximum)",
    "gradient": "plain gradient ‖∂logit/∂t‖ (normalised)",
}


def map_title(weighting: str, query: str | None = None, rule: str | None = None) -> str:
    """What a map of ``weighting`` shows, for its bar and caption: with the class query it uses
    (``query``; ``"max"`` for the maximum over the queries) for the ``class`` map, and how that
    query was chosen (``rule``) when there was a choice.

    Example:
        >>> map_title("coord"), map_title("class", "cat")
        ('GA box-coordinate weight', 'GA class weight, query “cat”')
        >>> map_title("class", "triangle", "matching: phrase head 'blue'")
        "GA class weight, query “triangle” (matching: phrase head 'blue')"
    """
    title = MAP_TITLES.get(weighting, f"GA {weighting} weight")
    if weighting != "class" or not query:
        return title
    if query == "max":
        title = f"{title}, maximum over the queries"
    elif query == "objectness":  # OWLv2's channel, not a query (class_query_name's name for it)
        title = f"{title}, OWLv2's objectness channel"
    else:
        title = f"{title}, query “{query}”"
    return f"{title} ({rule})" if rule else title


def class_query_name(result: GAResult, query: int | str | None = None) -> str:
    """The name of the class channel a ``class`` map of ``result`` uses: a query's text,
    ``"max"`` or ``"objectness"`` (OWLv2's channel; default: the result's own ``class_query``; ``"matching"`` as it resolved).

    Example:
        >>> class_query_name(result)  # doctest: +SKIP
        'cat'
    """
    chosen = result.channel(query)
    return str(chosen) if chosen in ("max", "objectness") else result.queries[int(chosen)]


def class_query_rule(result: GAResult, query: int | str | None = None) -> str | None:
    """How the class channel of ``result`` was chosen, for a legend: the ``matching`` rule's
    reason (``"matching: phrase head 'triangle'"``), ``"the first query"``, or None where the
    channel's name says it all (one query, an explicit index, the maximum).

    Example:
        >>> class_query_rule(result)  # doctest: +SKIP
        "matching: phrase head 'triangle'"
    """
    chosen = result.class_query if query is None else query
    if result.num_queries <= 1:
        return None
    if chosen == "matching":
        return f"matching: {result.class_match.rule}"
    if chosen == "first":
        return "the first query"
    return None


def result_title(result: GAResult, weighting: str, query: int | str | None = None) -> str:
    """The full legend of a map of ``result``: what it shows (:func:`map_title`, with its class
    channel and how it was chosen) and the contrast it is shown at.

    Example:
        >>> result_title(result, "class")  # doctest: +SKIP
        "GA class weight, query “triangle” (matching: phrase head 'blue'); 0: median patch, 1: top patch"
    """
    if weighting == "class" and result.num_queries:
        title = map_title(
            weighting, class_query_name(result, query), class_query_rule(result, query)
        )
    else:
        title = map_title(weighting)
    return f"{title}; {SHOWN_SCALE}"


def _display(
    image: Image.Image | None, size: tuple[int, int], shown: tuple[int, int] | None = None
) -> Image.Image:
    """The picture background: the RGB image (grey when explained from ``t``), at its drawing
    size (at least 512 px, at most MAX_SIDE; or exactly ``shown``)."""
    return fit_picture(image, size, shown, max_side=MAX_SIDE)


def overlay_image(
    image: Image.Image | None,
    saliency: np.ndarray,
    cmap: str = SPOTLIGHT,
    alpha: float = OVERLAY_ALPHA,
    shown: tuple[int, int] | None = None,
) -> Image.Image:
    """``saliency`` (H, W) in [0, 1] drawn on the image, as an RGB picture without bar: with
    :data:`~jmllm.joint.render.drawing.SPOTLIGHT` (the default) the map lights the photo
    (:func:`jmllm.joint.render.drawing.spotlight`: its own colours where the map is 1, dimmed where it
    is 0); with a matplotlib colour map, the colour map over it with opacity ``alpha × weight``
    (:func:`jmllm.joint.render.drawing.blend_map`).

    Args:
        image: the RGB image (None: grey).
        saliency: the map at the image's resolution, e.g. :meth:`GAResult.shown`.
        cmap: :data:`~jmllm.joint.render.drawing.SPOTLIGHT` or a matplotlib colour map.
        alpha: a colour map's opacity where its weight is 1.
        shown: (width, height) of the picture (default: at least 512 px, at most MAX_SIDE).

    Example:
        >>> overlay_image(None, np.ones((32, 48)), shown=(96, 64)).getpixel((0, 0))
        (128, 128, 128)
    """
    height, width = saliency.shape
    base = _display(image, (width, height), shown)
    if cmap == SPOTLIGHT:
        return spotlight(base, saliency)
    return blend_map(base, saliency, cmap, alpha)


def with_colour_bar(picture: Image.Image, cmap: str, label: str = "") -> Image.Image:
    """``picture`` with a colour bar of ``cmap`` titled ``label`` under it (the picture keeps its
    pixels at the top left).

    Example:
        >>> with_colour_bar(Image.new("RGB", (512, 256)), SPOTLIGHT, "GA class weight").width
        512
    """
    return figure(picture, bar=(cmap, label))


def heatmap_overlay_png(
    image: Image.Image | None,
    saliency: np.ndarray,
    title: str = "",
    cmap: str = SPOTLIGHT,
    alpha: float = OVERLAY_ALPHA,
    label: str = "GA weight",
) -> bytes:
    """PNG bytes of ``saliency`` (H, W) in [0, 1] drawn on the image (:func:`overlay_image`),
    with an optional title above and a bar titled ``label`` under it.

    Example:
        >>> png = heatmap_overlay_png(None, np.zeros((32, 48)), "empty", label=map_title("class"))
        >>> png[:4] == b"\\x89PNG"
        True
    """
    picture = overlay_image(image, saliency, cmap, alpha)
    return png_bytes(figure(picture, title, (cmap, label)))


def box_view_png(
    image: Image.Image | None,
    result: GAResult,
    title: str = "",
    class_threshold: float = 0.5,
    max_thickness: int = 10,
    query: int | str | None = None,
    cmap: str = "viridis",
    rule: str = "contrast",
) -> bytes:
    """PNG bytes of the box view (:func:`box_view_image`) with an optional title above and the
    colour bar under it."""
    picture = box_view_image(image, result, class_threshold, max_thickness, query, cmap, rule=rule)
    return png_bytes(figure(picture, title, (cmap, BOX_VIEW_BAR)))


def box_view_patches(
    result: GAResult,
    class_threshold: float = 0.5,
    query: int | str | None = None,
    max_boxes: int = BOX_VIEW_MAX,
    overlap: float = BOX_VIEW_OVERLAP,
    rule: str = "contrast",
) -> list[int]:
    """The patches a box view draws, heaviest first.

    ``rule="contrast"`` (the default): those whose shown class weight
    (:meth:`GAResult.shown_weights`: 0 the median patch, 1 the top patch) reaches
    ``class_threshold``, leaving out a box that overlaps (IoU ≥ ``overlap``) a heavier one
    already drawn — many patches of one object predict nearly its box — and at most
    ``max_boxes``. ``rule="authors"``: every patch whose normalised class weight
    (:meth:`GAResult.weights`) reaches ``class_threshold``, as their ``grad_heatmap.py`` draws
    (with a flat map, nearly every patch).

    Example:
        >>> box_view_patches(result)  # doctest: +SKIP
        [18, 41]
    """
    _check_choice("rule", rule, BOX_RULES)
    if rule == "authors":
        raw = result.weights("class", query).numpy()
        return [int(k) for k in np.argsort(-raw, kind="stable") if raw[k] >= class_threshold]
    weights = result.shown_weights("class", query).numpy()
    boxes = result.boxes_xyxy.astype(np.float64)
    kept: list[int] = []
    for k in np.argsort(-weights, kind="stable"):
        if weights[k] < class_threshold or len(kept) >= max_boxes:
            break
        if all(_iou(boxes[k], boxes[j]) < overlap for j in kept):
            kept.append(int(k))
    return kept


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def box_view_image(
    image: Image.Image | None,
    result: GAResult,
    class_threshold: float = 0.5,
    max_thickness: int = 10,
    query: int | str | None = None,
    cmap: str = "viridis",
    shown: tuple[int, int] | None = None,
    rule: str = "contrast",
) -> Image.Image:
    """The box view drawn on the image, without colour bar: every patch of
    :func:`box_view_patches` draws its predicted box (thickness = class weight ×
    ``max_thickness``, the shown weight under the ``contrast`` rule, the normalised one under
    ``authors``; colour = box-coordinate weight, the maximum over ``cx, cy, w, h``) and a red
    line from its grid cell to the box centre (:func:`box_view_png` adds the bar).

    Args:
        image: the RGB image (None: grey).
        result: a GA result.
        class_threshold: the shown class weight a patch needs (see :func:`box_view_patches`).
        max_thickness: the outline width of a patch of weight 1.
        query: the class channel (default: the result's own).
        cmap: the colour map of the box-coordinate weight.
        shown: (width, height) of the picture (default: at least 512 px, at most MAX_SIDE).
        rule: which patches draw their box (:func:`box_view_patches`).
    """
    from matplotlib import colormaps

    width, height = result.image_size
    base = _display(image, (width, height), shown)
    sx, sy = base.width / width, base.height / height
    colours = colormaps[cmap]
    if rule == "authors":
        class_w = result.weights("class", query).numpy()
    else:
        class_w = result.shown_weights("class", query).numpy()
    coord_w = result.weights("coord").numpy()
    side = round(len(class_w) ** 0.5)
    draw = ImageDraw.Draw(base)
    patches = box_view_patches(result, class_threshold, query, rule=rule)
    for k in reversed(patches):  # heaviest on top
        x0, y0, x1, y1 = result.boxes_xyxy[k]
        thickness = max(1, int(np.floor(max_thickness * class_w[k])))
        rgb = tuple(int(255 * c) for c in colours(float(coord_w[k]))[:3])
        draw.rectangle(
            (x0 * sx, y0 * sy, max(x0, x1 - 1) * sx, max(y0, y1 - 1) * sy),
            outline=rgb,
            width=thickness,
        )
        cell_x = ((k % side) + 0.5) / side * base.width
        cell_y = ((k // side) + 0.5) / side * base.height
        cx, cy = float(result.boxes[k, 0]) * base.width, float(result.boxes[k, 1]) * base.height
        draw.line((cell_x, cell_y, cx, cy), fill=(255, 0, 0), width=max(1, base.width // 384))
    return base


__all__ = [
    "BOX_RULES",
    "BOX_VIEW_BAR",
    "BOX_VIEW_CAPTION",
    "BOX_VIEW_MAX",
    "BOX_VIEW_OVERLAP",
    "MAP_TITLES",
    "MAX_SIDE",
    "SHOWN_SCALE",
    "box_view_image",
    "box_view_patches",
    "box_view_png",
    "class_query_name",
    "class_query_rule",
    "heatmap_overlay_png",
    "map_title",
    "overlay_image",
    "result_title",
    "with_colour_bar",
]
