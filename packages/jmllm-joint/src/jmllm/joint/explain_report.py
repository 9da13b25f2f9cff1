"""Pictures and the self-contained HTML report of GA explanations (DESIGN §1.3, issue 4 §2, §4).

- :func:`heatmap_overlay_png`: the map over the image with a colour bar (matplotlib, Agg canvas,
  no pyplot global state).
- :func:`box_view_png`: the paper's box view — every patch whose class weight reaches a threshold
  draws its predicted box with thickness ∝ class weight and colour = box-coordinate weight, plus a
  red line from the patch's grid cell to its box centre.
- :func:`write_explanation_report`: one HTML file (images as data URLs, inline CSS/JS, no network
  resource; every model text HTML-escaped) in which clicking a word of the answer shows its map
  and boxes, plus the PNGs and the raw arrays (``.safetensors``) beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from jmllm.joint.chat import PAPER_TEMPLATE, get_template
from jmllm.joint.report import atomic_write_bytes
from jmllm.joint.saliency import GAResult

MAX_SIDE = 768  # pictures are drawn at most this large (maps keep their full resolution)


def _display(
    image: Image.Image | None, size: tuple[int, int], shown: tuple[int, int] | None = None
) -> Image.Image:
    """The picture background: the RGB image (grey when explained from ``t``), at most MAX_SIDE
    (or exactly ``shown``)."""
    width, height = size
    base = image.convert("RGB") if image is not None else Image.new("RGB", size, (128, 128, 128))
    if shown is None:
        scale = min(1.0, MAX_SIDE / max(width, height))
        shown = (max(1, round(width * scale)), max(1, round(height * scale)))
    return base.resize(shown, Image.Resampling.BILINEAR) if base.size != shown else base


def overlay_image(
    image: Image.Image | None,
    saliency: np.ndarray,
    cmap: str = "jet",
    alpha: float = 0.5,
    shown: tuple[int, int] | None = None,
) -> Image.Image:
    """``saliency`` (H, W) in [0, 1] blended over the image, as an RGB picture without axes or
    colour bar (a fast view; :func:`heatmap_overlay_png` is the figure of the reports).

    Args:
        image: the RGB image (None: grey).
        saliency: the map at the image's resolution.
        cmap: matplotlib colour map.
        alpha: opacity of the map.
        shown: (width, height) of the picture (default at most MAX_SIDE, aspect kept).

    Example:
        >>> overlay_image(None, np.zeros((32, 48)), shown=(96, 64)).size
        (96, 64)
    """
    from matplotlib import colormaps

    height, width = saliency.shape
    base = _display(image, (width, height), shown)
    resized = Image.fromarray(np.nan_to_num(saliency).astype(np.float32), "F").resize(
        base.size, Image.Resampling.BILINEAR
    )
    colours = colormaps[cmap](np.clip(np.asarray(resized), 0.0, 1.0))[..., :3]  # (h, w, 3)
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) / 255 + alpha * colours
    return Image.fromarray((blended * 255).round().astype(np.uint8), "RGB")


def colour_bar_image(cmap: str, height: int, label: str = "", width: int = 18) -> Image.Image:
    """A vertical colour bar of ``cmap`` from 0 (bottom) to 1 (top), with its ends labelled.

    Example:
        >>> colour_bar_image("jet", 100).size[1]
        100
    """
    from matplotlib import colormaps

    ramp = np.linspace(1.0, 0.0, max(2, height))[:, None].repeat(width, axis=1)
    strip = Image.fromarray((colormaps[cmap](ramp)[..., :3] * 255).astype(np.uint8), "RGB")
    font = ImageFont.load_default()
    text_width = max(int(ImageDraw.Draw(strip).textlength(t, font=font)) for t in ("1", "0", label))
    bar = Image.new("RGB", (width + 6 + text_width, strip.height), (255, 255, 255))
    bar.paste(strip, (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((width + 4, 0), "1", fill=(0, 0, 0), font=font)
    draw.text((width + 4, strip.height - 12), "0", fill=(0, 0, 0), font=font)
    if label:
        draw.text((width + 4, strip.height // 2 - 6), label, fill=(0, 0, 0), font=font)
    return bar


def with_colour_bar(picture: Image.Image, cmap: str, label: str = "") -> Image.Image:
    """``picture`` with :func:`colour_bar_image` beside it, on the right."""
    bar = colour_bar_image(cmap, picture.height, label)
    out = Image.new("RGB", (picture.width + 8 + bar.width, picture.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(bar, (picture.width + 8, 0))
    return out


def _figure_png(draw: Any, aspect: float) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, max(2.0, 6.4 / max(aspect, 0.2))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(fig, ax)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def heatmap_overlay_png(
    image: Image.Image | None,
    saliency: np.ndarray,
    title: str = "",
    cmap: str = "jet",
    alpha: float = 0.5,
    label: str = "GA weight",
) -> bytes:
    """PNG bytes of ``saliency`` (H, W) in [0, 1] over the image, with a colour bar.

    Example:
        >>> png = heatmap_overlay_png(None, np.zeros((32, 48)), "empty")
        >>> png[:4] == b"\\x89PNG"
        True
    """
    height, width = saliency.shape
    base = _display(image, (width, height))
    shown = np.asarray(
        Image.fromarray(np.nan_to_num(saliency).astype(np.float32), "F").resize(
            base.size, Image.Resampling.BILINEAR
        )
    )

    def draw(fig: Any, ax: Any) -> None:
        ax.imshow(base)
        mappable = ax.imshow(shown, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
        fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04, label=label)
        if title:
            ax.set_title(title)

    return _figure_png(draw, base.width / base.height)


def box_view_png(
    image: Image.Image | None,
    result: GAResult,
    title: str = "",
    class_threshold: float = 0.5,
    max_thickness: int = 10,
    query: int | str | None = None,
    cmap: str = "viridis",
) -> bytes:
    """PNG bytes of the box view: for every patch with class weight ≥ ``class_threshold``, its
    box (thickness = class weight × ``max_thickness``, colour = box-coordinate weight, the
    maximum over ``cx, cy, w, h``) and a red line from the patch's cell to the box centre."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    base = box_view_image(image, result, class_threshold, max_thickness, query, cmap)

    def paint(fig: Any, ax: Any) -> None:
        ax.imshow(base)
        sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
        fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04, label="box-coordinate weight")
        if title:
            ax.set_title(title)

    return _figure_png(paint, base.width / base.height)


def box_view_image(
    image: Image.Image | None,
    result: GAResult,
    class_threshold: float = 0.5,
    max_thickness: int = 10,
    query: int | str | None = None,
    cmap: str = "viridis",
    shown: tuple[int, int] | None = None,
) -> Image.Image:
    """The box view drawn on the image, without axes or colour bar (see :func:`box_view_png`,
    whose figure holds exactly this picture).

    Args:
        image, result, class_threshold, max_thickness, query, cmap: as :func:`box_view_png`.
        shown: (width, height) of the picture (default at most MAX_SIDE, aspect kept).
    """
    from matplotlib import colormaps

    width, height = result.image_size
    base = _display(image, (width, height), shown).copy()
    sx, sy = base.width / width, base.height / height
    colours = colormaps[cmap]
    class_w = result.weights("class", query).numpy()
    coord_w = result.weights("coord").numpy()
    side = round(len(class_w) ** 0.5)
    draw = ImageDraw.Draw(base)
    for k in np.argsort(class_w, kind="stable"):
        if class_w[k] < class_threshold:
            continue
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
        draw.line((cell_x, cell_y, cx, cy), fill=(255, 0, 0), width=1)
    return base


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "token"


PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}
.turn{margin:.4em 0;line-height:1.8}.who{font-weight:600;margin-right:.4em}
button.w{font:inherit;border:1px solid #99b;background:#eef;border-radius:4px;padding:0 .25em;
cursor:pointer}
button.w.miss{background:#fdd;border-color:#c33}button.w.hit{background:#dfd;border-color:#393}
button.w.on{background:#335;color:#fff}
.panel{display:none;gap:1em;flex-wrap:wrap}.panel.on{display:flex}
.panel img{max-width:640px;width:100%;height:auto}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.15em .5em}
.note{color:#666;font-size:.9em}
"""

PAGE_JS = """
function show(k){document.querySelectorAll('.panel').forEach(p=>p.classList.toggle('on',p.id==='p-'+k));
document.querySelectorAll('button.w').forEach(b=>b.classList.toggle('on',b.dataset.k===k));}
document.querySelectorAll('button.w').forEach(b=>b.addEventListener('click',()=>show(b.dataset.k)));
const sel=document.getElementById('pick');if(sel){sel.addEventListener('change',()=>show(sel.value));}
const first=document.querySelector('button.w');if(first){show(first.dataset.k);}
"""


def page(title: str, body: str) -> str:
    """A self-contained HTML page (inline CSS and JS, no external resource)."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"{body}<script>{PAGE_JS}</script></body></html>\n"
    )


def highlighted_answer(
    text: str, spans: Sequence[tuple[int, int, str, str]], classes: dict[str, str] | None = None
) -> str:
    """``text`` escaped, with each (start, end, key, tooltip) span a clickable button."""
    classes = classes or {}
    out, cursor = [], 0
    for start, end, key, tip in sorted(spans):
        if start < cursor:
            continue  # overlapping spans: keep the first
        out.append(html.escape(text[cursor:start]))
        cls = " ".join(["w", classes.get(key, "")]).strip()
        out.append(
            f"<button class='{cls}' data-k='{html.escape(key)}' title='{html.escape(tip)}'>"
            f"{html.escape(text[start:end])}</button>"
        )
        cursor = end
    out.append(html.escape(text[cursor:]))
    return "".join(out)


def top_patches_table(result: GAResult, weighting: str = "class", top: int = 5) -> str:
    """An HTML table of the patches with the largest weights."""
    weights = result.weights(weighting)
    order = np.argsort(-weights.numpy(), kind="stable")[:top]
    side = round(len(weights) ** 0.5)
    rows = "".join(
        f"<tr><td>{k}</td><td>({k // side}, {k % side})</td><td>{float(weights[k]):.3f}</td>"
        f"<td>{html.escape(str(result.boxes_xyxy[k].tolist()))}</td>"
        + "".join(f"<td>{float(s):.3f}</td>" for s in result.similarities[k])
        + "</tr>"
        for k in order
    )
    head = "".join(f"<th>cos {html.escape(c)}</th>" for c in result.channels)
    return (
        f"<table><tr><th>patch</th><th>row, col</th><th>{html.escape(weighting)} weight</th>"
        f"<th>box (px)</th>{head}</tr>{rows}</table>"
    )


def result_panel(
    key: str, result: GAResult, image: Image.Image | None, weighting: str, title: str
) -> tuple[str, bytes, bytes]:
    """The HTML panel of one result, and its overlay and box-view PNGs."""
    overlay = heatmap_overlay_png(image, result.map(weighting), f"{title} — GA ({weighting})")
    boxes = box_view_png(image, result, f"{title} — boxes")
    tokens = " + ".join(repr(t.text) for t in result.tokens)
    html_panel = (
        f"<div class='panel' id='p-{html.escape(key)}'><div><img alt='GA map' "
        f"src='{data_url(overlay)}'><img alt='box view' src='{data_url(boxes)}'></div>"
        f"<div><p>Explained: <b>{html.escape(title)}</b> (tokens {html.escape(tokens)}; "
        f"‖g_L‖ = {result.g_llm_norm:.4g})</p>{top_patches_table(result, weighting)}</div></div>"
    )
    return html_panel, overlay, boxes


def save_arrays(path: Path, results: Sequence[tuple[str, GAResult]]) -> Path:
    """The raw tables of every result in one ``.safetensors`` file (keys ``<label>/<name>``)."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, Any] = {}
    for label, r in results:
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
) -> str:
    """The self-contained ``report.html`` page of :func:`write_explanation_report`, as a string
    (the same bytes, without the files written beside it).

    Example:
        >>> page = render_explanation_report(exp.image, exp.prompt, exp.answer_text,
        ...                                  exp.word_results)  # doctest: +SKIP
    """
    if template is None:
        template = _recorded_template(results)
    return _explanation_parts(image, prompt, answer_text, results, weighting, title, template)[0]


def _recorded_template(results: Sequence[GAResult]) -> str | None:
    """The conversation template the results record, if any."""
    return next((r.meta["template"] for r in results if "template" in r.meta), None)


def _explanation_parts(
    image: Image.Image | None,
    prompt: str,
    answer_text: str,
    results: Sequence[GAResult],
    weighting: str,
    title: str,
    template: str | None,
) -> tuple[str, dict[str, bytes], list[tuple[str, GAResult]], dict[str, Any]]:
    """The report page, its pictures (``maps/`` name → PNG), the labelled results and the
    summary record."""
    spans, panels, records, labelled = [], [], [], []
    pictures: dict[str, bytes] = {}
    for i, result in enumerate(results):
        key = f"r{i}"
        label = f"{i:03d}_{_slug(result.target)}"
        start = min((t.start for t in result.tokens), default=0)
        end = max((t.end for t in result.tokens), default=0)
        if end > start:
            spans.append((start, end, key, f"explain {result.target}"))
        panel, overlay, boxes = result_panel(key, result, image, weighting, result.target)
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
                "top_patches": np.argsort(-result.weights(weighting).numpy(), kind="stable")[
                    :10
                ].tolist(),
            }
        )
    options = "".join(
        f"<option value='r{i}'>{html.escape(r.target)}</option>" for i, r in enumerate(results)
    )
    queries = ", ".join(results[0].queries) if results else ""
    body = (
        f"<h1>{html.escape(title)}</h1>"
        f"<div class='turn'><span class='who'>USER:</span>{html.escape(prompt)}</div>"
        f"<div class='turn'><span class='who'>ASSISTANT:</span>"
        f"{highlighted_answer(answer_text, spans)}</div>"
        f"<p>Choose a word: <select id='pick'>{options}</select> "
        f"<span class='note'>OWL-ViT queries: {html.escape(queries)}; weighting: "
        f"{html.escape(weighting)}{_template_note(template)}. GA: cosine between ∂logit/∂t "
        f"and each OWL-ViT output's ∂/∂t (Giulivi &amp; Boracchi, BMVC 2024).</span></p>"
        + "".join(panels)
    )
    summary = {
        "prompt": prompt,
        "answer": answer_text,
        "queries": results[0].queries if results else [],
        "template": template,
        "weighting": weighting,
        "results": records,
    }
    return page(title, body), pictures, labelled, summary


def write_explanation_report(
    out_dir: str | os.PathLike[str],
    image: Image.Image | None,
    prompt: str,
    answer_text: str,
    results: Sequence[GAResult],
    weighting: str = "class",
    title: str = "GA explanation",
    template: str | None = None,
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
        image, prompt, answer_text, results, weighting, title, template
    )
    for name, png in pictures.items():
        atomic_write_bytes(maps / name, png)
    save_arrays(out / "arrays.safetensors", labelled)
    atomic_write_bytes(out / "explanation.json", (json.dumps(summary, indent=2) + "\n").encode())
    return atomic_write_bytes(out / "report.html", report.encode("utf-8"))


def _template_note(template: str | None) -> str:
    if template is None:
        return ""
    first = get_template(template).first
    return (
        f"; conversation template: {html.escape(template)} "
        f"(<code>{html.escape(first.replace(chr(10), '⏎'))}</code>)"
    )


OBJECT_QUESTION = "What's in the image?"
OBJECT_ANSWER = "The image shows a {}"  # the paper's WSOL/user-study setting, teacher-forced
OBJECT_VIEWS = ("box", "overlay")


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
) -> Image.Image:
    """A picture of J's GA explanation of one object in an image (the user study's questions).

    The setting is the paper's: J is asked ``question`` and teacher-forced to answer
    ``"The image shows a <object_name>"``; the explained target is every token of the object
    name (their logits summed, so multi-word names such as ``"traffic light"`` work), against
    the OWL-ViT query ``a photo of a <object_name>`` (or ``queries``).

    Args:
        image: path, PIL image or (3, H, W) uint8 tensor.
        object_name: the object to explain, e.g. ``"cat"``.
        model: a :class:`~jmllm.joint.JointModel`.
        view: ``"box"`` (the box view of the paper's user-study figures) or ``"overlay"``
            (heat map over the image with a colour bar).
        weighting: map weighting for the overlay (``class``, ``coord``, ``any``, ``gradient``).
        queries: OWL-ViT queries (default ``[object_name]``).
        question: the question asked before the forced answer.
        ga: a :class:`~jmllm.joint.GradientAlignment` to reuse (its OWL norm cache is kept
            between objects of the same image only if the queries are the same).
        template: the conversation template, ``"paper"`` (default: the authors' prompt,
            ``<image>\\nUSER: {question}\\nASSISTANT:``) or ``"llava-1.5"``.
        title: a title drawn above the picture. None (the default) draws none: these pictures
            are shown to user-study participants, who must not read the object's name on them.

    Returns:
        The RGB picture.

    Raises:
        GAError: empty object name, unknown view or weighting.

    Example:
        >>> from jmllm.joint import JointModel, explain_object
        >>> model = JointModel.from_pretrained(alignment="w.safetensors")  # doctest: +SKIP
        >>> explain_object("q1.png", "cat", model=model).save("q1_cat.png")  # doctest: +SKIP
    """
    from jmllm.joint.saliency import WEIGHTINGS, GAError, GradientAlignment, answer_tokens

    name = " ".join(str(object_name).split())
    if not name:
        raise GAError("object_name: is empty")
    if view not in OBJECT_VIEWS:
        raise GAError(f"view: expected one of {', '.join(OBJECT_VIEWS)}, got {view!r}")
    if weighting not in (*WEIGHTINGS, "gradient"):
        raise GAError(
            f"weighting: expected one of {', '.join(WEIGHTINGS)}, gradient; got {weighting!r}"
        )
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
    source = image if bare_t or hasattr(image, "image_sizes") else model.embed(image)
    result = ga.attribute(
        source,
        question,
        target=positions,
        queries=list(queries or [name]),
        answer=answer,
        template=template,
    )
    picture = source.pil_image(0) if not bare_t and getattr(source, "images", None) else None
    if view == "box":
        png = box_view_png(picture, result, title or "")
    else:
        png = heatmap_overlay_png(picture, result.map(weighting), title or "")
    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB")


__all__ = [
    "OBJECT_ANSWER",
    "OBJECT_QUESTION",
    "box_view_image",
    "box_view_png",
    "colour_bar_image",
    "data_url",
    "explain_object",
    "heatmap_overlay_png",
    "highlighted_answer",
    "overlay_image",
    "page",
    "render_explanation_report",
    "save_arrays",
    "with_colour_bar",
    "write_explanation_report",
]
