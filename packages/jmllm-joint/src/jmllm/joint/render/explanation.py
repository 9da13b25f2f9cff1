"""Pictures and the self-contained HTML report of GA explanations (DESIGN §1.3).

- :func:`heatmap_overlay_png`: the map lighting the photo (:func:`jmllm.joint.render.drawing.spotlight`:
  the photo's own colours where the map is high, dimmed where it is low, a white line at half
  height), at the contrast of :meth:`GAResult.shown` (0: the median patch, 1: the top patch), with
  a bar titled by what it shows: the weighting and the class channel it used.
- :func:`box_view_png`: the paper's box view — the patches whose shown class weight reaches a
  threshold draw their predicted boxes (one per object: boxes overlapping a heavier one are
  left out, at most :data:`BOX_VIEW_MAX` of them) with thickness ∝ class weight and colour =
  box-coordinate weight, plus a red line from the patch's grid cell to its box centre.
- :func:`write_attribution_report`: the same page for another attribution method
  (:mod:`jmllm.joint.saliency.attribution`), one map per word.
- :func:`write_explanation_report`: one HTML file (the Jinja2 template
  ``templates/explanation.html``: images as data URLs, inline CSS/JS, no network resource, every
  model text escaped) in which clicking a word of the answer, or choosing it in the word picker,
  shows its map and box view side by side, plus the PNGs and the raw arrays (``.safetensors``)
  beside it.

Every picture follows :mod:`jmllm.joint.render.drawing` (sizes, fonts, colours, the overlay rule).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from jmllm.align.preprocessing import PAPER_PREPROCESSING
from jmllm.joint.chat.templates import PAPER_TEMPLATE, get_template
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION
from jmllm.joint.render.drawing import (
    OVERLAY_ALPHA,
    SPOTLIGHT,
    blend_map,
    figure,
    fit_picture,
    spotlight,
)
from jmllm.joint.render.pages import Markup, environment, render
from jmllm.joint.render.report import atomic_write_bytes, png_bytes
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
    title = f"{title}, maximum over the queries" if query == "max" else f"{title}, query “{query}”"
    return f"{title} ({rule})" if rule else title


def class_query_name(result: GAResult, query: int | str | None = None) -> str:
    """The name of the class channel a ``class`` map of ``result`` uses: a query's text, or
    ``"max"`` (default: the result's own ``class_query``; ``"matching"`` as it resolved).

    Example:
        >>> class_query_name(result)  # doctest: +SKIP
        'cat'
    """
    chosen = result.channel(query)
    return "max" if chosen == "max" else result.queries[int(chosen)]


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


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "token"


def page(title: str, body: str) -> str:
    """A self-contained HTML page (shared stylesheet and word-picking script inline, no
    external resource) around ``body``, which must be HTML built and escaped by the caller."""
    return render("base.html", script=True, title=title, body=Markup(body))


def highlighted_answer(
    text: str, spans: Sequence[tuple[int, int, str, str]], classes: dict[str, str] | None = None
) -> Markup:
    """``text`` escaped, with each (start, end, key, tooltip) span a clickable button
    (``templates/answer.html``, autoescaped)."""
    classes = classes or {}
    segments: list[tuple[str, dict[str, str] | None]] = []
    cursor = 0
    for start, end, key, tip in sorted(spans):
        if start < cursor:
            continue  # overlapping spans: keep the first
        cls = " ".join(["w", classes.get(key, "")]).strip()
        segments.append((text[cursor:start], None))
        segments.append((text[start:end], {"cls": cls, "key": key, "tip": tip}))
        cursor = end
    segments.append((text[cursor:], None))
    return Markup(environment().get_template("answer.html").render(segments=segments))


def top_patches(
    result: GAResult, weighting: str = "class", top: int = 5, query: int | str | None = None
) -> dict[str, list[Any]]:
    """Headers and rows of the patches with the largest weights (the report's table)."""
    weights = result.weights(weighting, query)
    order = np.argsort(-weights.numpy(), kind="stable")[:top]
    side = round(len(weights) ** 0.5)
    rows = [
        [
            int(k),
            f"({k // side}, {k % side})",
            f"{float(weights[k]):.3f}",
            str(result.boxes_xyxy[k].tolist()),
            *(f"{float(s):.3f}" for s in result.similarities[k]),
        ]
        for k in order
    ]
    headers = ["patch", "row, col", f"{weighting} weight", "box (px)"]
    headers += [f"cos {c}" for c in result.channels]
    return {"headers": headers, "rows": rows}


def word_number(text: str, start: int) -> int:
    """The 1-based number of the word of ``text`` at character ``start`` (words as GA counts
    them), so that repeated words can be told apart.

    Example:
        >>> word_number("a dog and a dog", 12)
        5
    """
    from jmllm.joint.saliency import _WORD

    return 1 + sum(1 for m in _WORD.finditer(text) if m.start() < start)


def word_choice_labels(words: Sequence[str], numbers: Sequence[int]) -> list[str]:
    """The labels of a word picker: a word alone when it occurs once, with its place in the
    answer (``numbers``, 1-based word numbers) when it is repeated, so that every entry can be
    told apart.

    Example:
        >>> word_choice_labels(["a", "dog", "d", "d"], [1, 2, 3, 4])
        ['a', 'dog', 'd (word 3)', 'd (word 4)']
    """
    counts = Counter(words)
    return [
        f"{word} (word {number})" if counts[word] > 1 else word
        for word, number in zip(words, numbers, strict=True)
    ]


def result_panel(
    key: str,
    result: GAResult,
    image: Image.Image | None,
    weighting: str,
    title: str,
    query: int | str | None = None,
) -> tuple[dict[str, Any], bytes, bytes]:
    """The page panel of one result (a template context), and its overlay and box-view PNGs.

    Args:
        key: the panel's key (the clickable word's ``data-k``).
        result, image, weighting: what to draw.
        title: the explained word, as shown.
        query: the class channel of the map and the box view (default: the result's own).
    """
    legend = result_title(result, weighting, query)
    overlay = heatmap_overlay_png(
        image, result.shown(weighting, query), f"{title}: GA ({weighting})", label=legend
    )
    boxes = box_view_png(image, result, f"{title}: box view", query=query)
    tokens = " + ".join(repr(t.text) for t in result.tokens)
    panel = {
        "key": key,
        "overlay": data_url(overlay),
        "boxes": data_url(boxes),
        "overlay_caption": (
            f"GA map of {title!r}: {legend}. The photo keeps its colours where the map is high "
            "and is dimmed where it is low; the white line surrounds half the top weight."
        ),
        "boxes_caption": BOX_VIEW_CAPTION,
        "lines": [f"Explained: {title} (tokens {tokens}; ‖g_L‖ = {result.g_llm_norm:.4g})"],
        "table": top_patches(result, weighting, query=query),
    }
    return panel, overlay, boxes


def save_arrays(
    path: Path,
    results: Sequence[tuple[str, GAResult]],
    weighting: str = "class",
    query: int | str | None = None,
) -> Path:
    """The raw tables of every result in one ``.safetensors`` file (keys ``<label>/<name>``),
    and ``<label>/map``: the (H, W) map its picture shows (:meth:`GAResult.shown` of
    ``weighting`` and ``query``, at the image's size)."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, Any] = {}
    for label, r in results:
        # what the picture shows, at the image's size: maps can be checked without pictures
        tensors[f"{label}/map"] = torch.from_numpy(np.ascontiguousarray(r.shown(weighting, query)))
        tensors[f"{label}/similarities"] = r.similarities.float().clone()
        tensors[f"{label}/normalised"] = r.normalised.float().clone()
        tensors[f"{label}/numerators"] = r.numerators.float().clone()
        tensors[f"{label}/norms"] = r.norms.float().clone()
        tensors[f"{label}/boxes"] = r.boxes.float().clone()
        tensors[f"{label}/patch_gradient_norms"] = r.patch_gradient_norms.float().clone()
    meta = {label: ",".join(r.channels) for label, r in results}
    data = save({k: torch.as_tensor(v) for k, v in tensors.items()}, metadata=meta)
    return atomic_write_bytes(path, data)


def render_explanation_report(
    image: Image.Image | None,
    prompt: str,
    answer_text: str,
    results: Sequence[GAResult],
    weighting: str = "class",
    title: str = "GA explanation",
    template: str | None = None,
    query: int | str | None = None,
) -> str:
    """The self-contained ``report.html`` page of :func:`write_explanation_report`, as a string
    (the same bytes, without the files written beside it).

    Example:
        >>> page = render_explanation_report(exp.image, exp.prompt, exp.answer_text,
        ...                                  exp.word_results)  # doctest: +SKIP
    """
    if template is None:
        template = _recorded_template(results)
    return _explanation_parts(
        image, prompt, answer_text, results, weighting, title, template, query
    )[0]


def _recorded_template(results: Sequence[GAResult]) -> str | None:
    """The conversation template the results record, if any."""
    return _recorded(results, "template")


def _recorded(results: Sequence[GAResult], key: str) -> Any:
    """What the results' ``meta`` record under ``key`` (the first that does), else None."""
    return next((r.meta[key] for r in results if key in r.meta), None)


def _explanation_parts(
    image: Image.Image | None,
    prompt: str,
    answer_text: str,
    results: Sequence[GAResult],
    weighting: str,
    title: str,
    template: str | None,
    query: int | str | None = None,
) -> tuple[str, dict[str, bytes], list[tuple[str, GAResult]], dict[str, Any]]:
    """The report page, its pictures (``maps/`` name → PNG), the labelled results and the
    summary record."""
    spans, panels, records, labelled, numbers = [], [], [], [], []
    pictures: dict[str, bytes] = {}
    for i, result in enumerate(results):
        key = f"r{i}"
        label = f"{i:03d}_{_slug(result.target)}"
        start = min((t.start for t in result.tokens), default=0)
        end = max((t.end for t in result.tokens), default=0)
        number = word_number(answer_text, start) if end > start else i + 1
        if end > start:
            spans.append((start, end, key, f"explain {result.target} (word {number})"))
        numbers.append(number)
        panel, overlay, boxes = result_panel(key, result, image, weighting, result.target, query)
        panels.append(panel)
        pictures[f"{label}_{weighting}.png"] = overlay
        pictures[f"{label}_boxes.png"] = boxes
        labelled.append((label, result))
        records.append(
            {
                "label": label,
                "target": result.target,
                "tokens": [
                    {"position": t.position, "id": t.token_id, "text": t.text}
                    for t in result.tokens
                ],
                "g_llm_norm": result.g_llm_norm,
                "class_query": class_query_name(result, query) if result.num_queries else None,
                "class_query_rule": class_query_rule(result, query),
                "top_patches": np.argsort(-result.weights(weighting, query).numpy(), kind="stable")[
                    :10
                ].tolist(),
            }
        )
    labels = word_choice_labels([r.target for r in results], numbers)
    options = [{"key": f"r{i}", "label": label} for i, label in enumerate(labels)]
    page_html = render(
        "explanation.html",
        script=True,
        title=title,
        prompt=prompt,
        answer=highlighted_answer(answer_text, spans),
        options=options,
        queries=", ".join(results[0].queries) if results else "",
        weighting=weighting,
        template_name=template,
        template_first=get_template(template).first.replace("\n", "⏎") if template else None,
        panels=panels,
    )
    summary = {
        "prompt": prompt,
        "answer": answer_text,
        "queries": results[0].queries if results else [],
        "template": template,
        "tokenization": _recorded(results, "tokenization"),
        "preprocessing": _recorded(results, "preprocessing"),
        "weighting": weighting,
        "results": records,
    }
    return page_html, pictures, labelled, summary


def write_explanation_report(
    out_dir: str | os.PathLike[str],
    image: Image.Image | None,
    prompt: str,
    answer_text: str,
    results: Sequence[GAResult],
    weighting: str = "class",
    title: str = "GA explanation",
    template: str | None = None,
    query: int | str | None = None,
) -> Path:
    """Write ``report.html`` (self-contained), ``maps/*.png``, ``explanation.json`` and
    ``arrays.safetensors`` for GA results of one answer.

    Each result becomes a clickable span of the answer (its tokens' characters); choosing it shows
    its map, its box view and its top patches.

    Args:
        out_dir: output folder (created).
        image: the RGB image (None: grey background).
        prompt: the question; answer_text: the answer the results explain.
        results: GA results (e.g. ``AnswerExplanation.word_results``, or one ``attribute``).
        weighting: map weighting shown (``class``, ``coord``, ``any``, ``gradient``).
        title: page title.
        template: the conversation template the prompt was put in (shown and recorded;
            default: the one the results record, if any).
        query: the class channel of every map (default: each result's own, e.g. the query the
            word refers to; ``"first"``, ``"max"`` or a query index).

    Returns:
        the path of ``report.html``.

    Example:
        >>> write_explanation_report("out", exp.image, exp.prompt, exp.answer_text,
        ...                          exp.word_results)  # doctest: +SKIP
    """
    if template is None:
        template = _recorded_template(results)
    out = Path(out_dir)
    maps = out / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    report, pictures, labelled, summary = _explanation_parts(
        image, prompt, answer_text, results, weighting, title, template, query
    )
    for name, png in pictures.items():
        atomic_write_bytes(maps / name, png)
    save_arrays(out / "arrays.safetensors", labelled, weighting, query)
    atomic_write_bytes(out / "explanation.json", (json.dumps(summary, indent=2) + "\n").encode())
    return atomic_write_bytes(out / "report.html", report.encode("utf-8"))


def write_attribution_report(
    out_dir: str | os.PathLike[str],
    image: Image.Image | None,
    prompt: str,
    answer_text: str,
    attributions: Sequence[Any],
    method: Any,
    template: str | None = None,
) -> Path:
    """The report of another attribution method (:mod:`jmllm.joint.saliency.attribution`) for one
    answer: ``report.html`` (the same page as GA's, one map per explained word), ``maps/*.png``,
    ``explanation.json`` (each word's top patches) and ``arrays.safetensors`` (each word's
    scores over ``t``'s grid, key ``<label>/scores``).

    Args:
        out_dir: output folder (created).
        image: the RGB image (None: grey background).
        prompt: the question; answer_text: the answer.
        attributions: :class:`~jmllm.joint.saliency.attribution.Attribution` of its words.
        method: the :class:`~jmllm.joint.saliency.attribution.AttributionMethod` that made them (its name
            and source are shown).
        template: the conversation template the prompt was put in.

    Example:
        >>> write_attribution_report("out", image, "What's in the image?", answer, maps,
        ...                          get_method("gradient", model))  # doctest: +SKIP
    """
    from safetensors.torch import save

    out = Path(out_dir)
    maps_dir = out / "maps"
    maps_dir.mkdir(parents=True, exist_ok=True)
    spans, panels, records, numbers = [], [], [], []
    tensors: dict[str, torch.Tensor] = {}
    signed = " (signed, shown min–max normalised)" if getattr(method, "signed", False) else ""
    for i, a in enumerate(attributions):
        key, label = f"r{i}", f"{i:03d}_{_slug(a.label)}"
        start = min((t.start for t in a.tokens), default=0)
        end = max((t.end for t in a.tokens), default=0)
        number = word_number(answer_text, start) if end > start else i + 1
        if end > start:
            spans.append((start, end, key, f"explain {a.label} (word {number})"))
        numbers.append(number)
        overlay = heatmap_overlay_png(
            image, a.map(), f"{a.label}: {a.method}", label=f"{a.method} score{signed}"
        )
        atomic_write_bytes(maps_dir / f"{label}_{a.method}.png", overlay)
        order = np.argsort(-a.scores.numpy(), kind="stable")
        side = round(a.scores.numel() ** 0.5)
        rows = [
            [int(k), f"({k // side}, {k % side})", f"{float(a.scores[k]):.4g}"] for k in order[:5]
        ]
        panels.append(
            {
                "key": key,
                "overlay": data_url(overlay),
                "overlay_alt": f"{a.method} map",
                "overlay_caption": f"{a.method} map of {a.label!r}{signed}.",
                "boxes": None,
                "lines": [
                    f"Explained: {a.label} (tokens {' + '.join(repr(t.text) for t in a.tokens)})"
                ],
                "table": {"headers": ["patch", "row, col", "score"], "rows": rows},
            }
        )
        tensors[f"{label}/scores"] = a.scores.float().clone()
        records.append(
            {
                "label": label,
                "target": a.label,
                "tokens": [
                    {"position": t.position, "id": t.token_id, "text": t.text} for t in a.tokens
                ],
                "top_patches": order[:10].tolist(),
            }
        )
    labels = word_choice_labels([a.label for a in attributions], numbers)
    name = getattr(method, "name", "method")
    html = render(
        "explanation.html",
        script=True,
        title=f"{name} explanation",
        prompt=prompt,
        answer=highlighted_answer(answer_text, spans),
        options=[{"key": f"r{i}", "label": text} for i, text in enumerate(labels)],
        method_note=f"Method: {name} — {getattr(method, 'source', '')}.",
        template_name=template,
        template_first=get_template(template).first.replace("\n", "⏎") if template else None,
        panels=panels,
    )
    atomic_write_bytes(out / "arrays.safetensors", save(tensors, metadata={"method": name}))
    summary = {"prompt": prompt, "answer": answer_text, "method": name, "template": template,
               "results": records}  # fmt: skip
    atomic_write_bytes(out / "explanation.json", (json.dumps(summary, indent=2) + "\n").encode())
    return atomic_write_bytes(out / "report.html", html.encode("utf-8"))


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
    "BOX_RULES",
    "BOX_VIEW_BAR",
    "MAP_TITLES",
    "OBJECT_ANSWER",
    "OBJECT_QUESTION",
    "box_view_image",
    "box_view_patches",
    "box_view_png",
    "class_query_name",
    "class_query_rule",
    "data_url",
    "explain_object",
    "heatmap_overlay_png",
    "highlighted_answer",
    "map_title",
    "object_explanation",
    "object_picture",
    "overlay_image",
    "page",
    "render_explanation_report",
    "result_title",
    "save_arrays",
    "top_patches",
    "with_colour_bar",
    "word_choice_labels",
    "word_number",
    "write_attribution_report",
    "write_explanation_report",
]
