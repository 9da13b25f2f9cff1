"""The self-contained HTML reports of GA's and other methods' explanations (DESIGN §1.3).

- :func:`write_explanation_report`: one HTML file (the Jinja2 template
  ``templates/explanation.html``: images as data URLs, inline CSS/JS, no network resource, every
  model text escaped) in which clicking a word of the answer, or choosing it in the word picker,
  shows its map and box view side by side, plus the PNGs and the raw arrays (``.safetensors``)
  beside it; :func:`render_explanation_report`: the same page as a string.
- :func:`write_attribution_report`: the same page for another attribution method
  (:mod:`jmllm.joint.saliency.attribution`), one map per word.
- The page's pieces, shared by the other reports: :func:`data_url`, :func:`page`,
  :func:`highlighted_answer`, :func:`result_panel`, :func:`word_choice_labels`.

The pictures and their legends are :mod:`jmllm.joint.render.explanation_pictures`'s (the map
lighting the photo, the box view); one object explained as in the user study
(:func:`explain_object`) is :mod:`jmllm.joint.render.object_explanation`'s. Their names are
importable from here too.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jmllm.align.preprocessing import PAPER_PREPROCESSING as PAPER_PREPROCESSING
from jmllm.joint.chat.templates import PAPER_TEMPLATE as PAPER_TEMPLATE
from jmllm.joint.chat.templates import get_template
from jmllm.joint.chat.tokenization import PAPER_TOKENIZATION as PAPER_TOKENIZATION
from jmllm.joint.render.drawing import OVERLAY_ALPHA as OVERLAY_ALPHA
from jmllm.joint.render.drawing import SPOTLIGHT as SPOTLIGHT
from jmllm.joint.render.drawing import blend_map as blend_map
from jmllm.joint.render.drawing import figure as figure
from jmllm.joint.render.drawing import fit_picture as fit_picture
from jmllm.joint.render.drawing import spotlight as spotlight
from jmllm.joint.render.explanation_pictures import (
    BOX_RULES,
    BOX_VIEW_BAR,
    BOX_VIEW_CAPTION,
    MAP_TITLES,
    box_view_image,
    box_view_patches,
    box_view_png,
    class_query_name,
    class_query_rule,
    heatmap_overlay_png,
    map_title,
    overlay_image,
    result_title,
    with_colour_bar,
)
from jmllm.joint.render.explanation_pictures import BOX_VIEW_MAX as BOX_VIEW_MAX
from jmllm.joint.render.explanation_pictures import BOX_VIEW_OVERLAP as BOX_VIEW_OVERLAP
from jmllm.joint.render.explanation_pictures import MAX_SIDE as MAX_SIDE
from jmllm.joint.render.explanation_pictures import SHOWN_SCALE as SHOWN_SCALE
from jmllm.joint.render.object_explanation import (
    OBJECT_ANSWER,
    OBJECT_QUESTION,
    explain_object,
    object_explanation,
    object_picture,
)
from jmllm.joint.render.object_explanation import OBJECT_VIEWS as OBJECT_VIEWS
from jmllm.joint.render.pages import Markup, environment, render
from jmllm.joint.render.report import atomic_write_bytes
from jmllm.joint.render.report import png_bytes as png_bytes
from jmllm.joint.saliency import GAResult, names_a_query


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


def opening_word(words: Sequence[str], queries: Sequence[str]) -> int:
    """The index of the word an explanation page opens on: the first that names one of the
    detector's queries (a query's head noun, singular or plural: the object word a reader
    looks for first), else the first word. Opening on the first word would show the map of a
    word that names nothing (the demo's caption begins with "a").

    Example:
        >>> opening_word(["a", "yellow", "triangle", "and"], ["circle", "triangle"])
        2
        >>> opening_word(["a", "cat"], ["a photo of a cat"]), opening_word(["hi"], [])
        (1, 0)
    """
    return next((i for i, word in enumerate(words) if names_a_query(word, queries)), 0)


def _options(labels: Sequence[str], words: Sequence[str], queries: Sequence[str]) -> list[dict]:
    """The word picker's entries (template context), the :func:`opening_word` selected."""
    opening = opening_word(words, queries)
    return [
        {"key": f"r{i}", "label": label, "selected": i == opening} for i, label in enumerate(labels)
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
    notes: Sequence[str] = (),
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
        image, prompt, answer_text, results, weighting, title, template, query, notes
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
    notes: Sequence[str] = (),
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
    options = _options(labels, [r.target for r in results], results[0].queries if results else [])
    page_html = render(
        "explanation.html",
        script=True,
        title=title,
        notes=list(notes),
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
        "notes": list(notes),
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
    notes: Sequence[str] = (),
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
        notes: notices at the top of the page, recorded in ``explanation.json`` (e.g. that the
            image is not a toy scene, so the answer and its maps mean nothing).

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
        image, prompt, answer_text, results, weighting, title, template, query, notes
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
    queries: Sequence[str] = (),
    notes: Sequence[str] = (),
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
        queries: detector queries, if any: the page opens on the first word naming one
            (:func:`opening_word`), as GA's does.
        notes: notices at the top of the page, recorded in ``explanation.json``.

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
        notes=list(notes),
        prompt=prompt,
        answer=highlighted_answer(answer_text, spans),
        options=_options(labels, [a.label for a in attributions], queries),
        method_note=f"Method: {name} — {getattr(method, 'source', '')}.",
        template_name=template,
        template_first=get_template(template).first.replace("\n", "⏎") if template else None,
        panels=panels,
    )
    atomic_write_bytes(out / "arrays.safetensors", save(tensors, metadata={"method": name}))
    summary = {"prompt": prompt, "answer": answer_text, "method": name, "template": template,
               "notes": list(notes), "results": records}  # fmt: skip
    atomic_write_bytes(out / "explanation.json", (json.dumps(summary, indent=2) + "\n").encode())
    return atomic_write_bytes(out / "report.html", html.encode("utf-8"))


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
    "opening_word",
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
