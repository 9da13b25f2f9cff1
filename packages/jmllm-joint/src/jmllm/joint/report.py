"""Rendering: detections drawn on the image (PNG) and a self-contained HTML report.

The report holds the image (embedded as a ``data:`` URL, so the file can be mailed or opened
anywhere), the conversation, J's detections drawn on the image and a table of them, and,
optionally, stock LLaVA's answers beside J's. Every piece of model text, every label and every
user string is escaped with :func:`html.escape`: a model that answers ``<script>`` shows that
text, it does not run it (DESIGN §6).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from jmllm.align import files
from jmllm.align.images import box_scale
from jmllm.joint.chat import Conversation, get_template
from jmllm.joint.detection import Detections

# Colour-blind-safe palette (Okabe–Ito), one colour per query label.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (0, 0, 0),
]


def label_colour(label: int) -> tuple[int, int, int]:
    """The drawing colour of query ``label``."""
    return PALETTE[label % len(PALETTE)]


def draw_detections(
    image: Image.Image, detections: Detections, max_boxes: int = 20, width: int | None = None
) -> Image.Image:
    """A copy of ``image`` with the top ``max_boxes`` detections drawn and labelled.

    Args:
        image: the original image, or a uniformly scaled copy of it (the working copy of a large
            photo): boxes, in original pixels, are scaled to it.
        detections: from :meth:`JointModel.detect`, highest score first.
        max_boxes: how many boxes to draw.
        width: line width in pixels (default: scaled to the image size).

    Returns:
        An RGB PIL image.

    Example:
        >>> import torch
        >>> d = Detections(torch.tensor([[2., 2., 20., 20.]]), torch.tensor([0.9]),
        ...                torch.tensor([0]), ["cat"], torch.tensor([0]), (32, 32))
        >>> draw_detections(Image.new("RGB", (32, 32)), d).size
        (32, 32)
    """
    canvas = image.convert("RGB").copy()
    # the image may be the working copy of a larger original (boxes are in original pixels)
    sx, sy = box_scale(detections.image_size, canvas.size)
    draw = ImageDraw.Draw(canvas)
    line = width or max(1, round(max(canvas.size) / 200))
    font = ImageFont.load_default()
    for box, score, label in list(
        zip(detections.boxes, detections.scores, detections.labels, strict=True)
    )[:max_boxes]:
        colour = label_colour(int(label))
        x0, y0, x1, y1 = (float(v) * f for v, f in zip(box, (sx, sy, sx, sy), strict=True))
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=line)
        text = f"{detections.queries[int(label)]} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text(
            (x0 + 1, ty), text, fill=(255, 255, 255) if sum(colour) < 400 else (0, 0, 0), font=font
        )
    return canvas


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably: a temporary file in the same folder,
    flushed to disk, then renamed; readers see the old file or the new one, never half of one.

    The file gets the ordinary permissions of a new file (0666 less the umask), not mkstemp's
    0600. The one writer of every package: :func:`jmllm.align.files.atomic_write_bytes`.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.bin"
        >>> atomic_write_bytes(target, b"x").read_bytes()
        b'x'
    """
    return files.atomic_write_bytes(path, data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return files.atomic_write_text(path, text)


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Save ``image`` as PNG, atomically."""
    return atomic_write_bytes(path, png_bytes(image))


def image_data_url(image: Image.Image) -> str:
    """A ``data:image/png;base64,…`` URL of ``image`` (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


REPORT_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.note { background: #fff4d6; border-left: 4px solid #e69f00; padding: .5rem 1rem; }
.images { display: flex; gap: 1rem; flex-wrap: wrap; }
.images figure { margin: 0; } .images img { max-width: 28rem; border: 1px solid #ccc; }
.turn { margin: .6rem 0; display: grid; grid-template-columns: 8rem 1fr; } .role { font-weight: 600; }
.answer { white-space: pre-wrap; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2rem .6rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem; }
"""


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _conversation_html(conversation: Conversation, stock: Conversation | None) -> str:
    rows = []
    for i, turn in enumerate(conversation.turns):
        rows.append(
            f'<div class="turn"><span class="role">User</span>'
            f'<span class="answer">{_escape(turn.question)}</span></div>'
        )
        rows.append(
            f'<div class="turn"><span class="role">J</span>'
            f'<span class="answer">{_escape(turn.answer or "")}</span></div>'
        )
        if stock is not None and i < len(stock.turns):
            rows.append(
                f'<div class="turn"><span class="role">Stock LLaVA</span>'
                f'<span class="answer">{_escape(stock.turns[i].answer or "")}</span></div>'
            )
    return "\n".join(rows)


def _detections_table(detections: Detections, max_rows: int) -> str:
    if not len(detections):
        return f"<p>No detection scored at least {detections.threshold:g}.</p>"
    rows = []
    for i, record in enumerate(detections.to_records()[:max_rows]):
        r, g, b = label_colour(detections.queries.index(record["label"]))
        box = ", ".join(f"{v:.1f}" for v in record["box"])
        rows.append(
            f'<tr><td class="num">{i + 1}</td><td><span class="swatch" '
            f'style="background: rgb({r},{g},{b})"></span>{_escape(record["label"])}</td>'
            f'<td class="num">{record["score"]:.3f}</td><td class="num">{box}</td>'
            f'<td class="num">{record["patch"]}</td></tr>'
        )
    more = len(detections) - max_rows
    tail = f"<p>{more} more detections not shown.</p>" if more > 0 else ""
    return (
        "<table><thead><tr><th>#</th><th>Label</th><th>Score</th>"
        "<th>Box x0, y0, x1, y1 (px)</th><th>Patch</th></tr></thead><tbody>"
        + "\n".join(rows)
        + "</tbody></table>"
        + tail
    )


def render_report_html(
    image: Image.Image,
    *,
    conversation: Conversation | None = None,
    detections: Detections | None = None,
    stock: Conversation | None = None,
    title: str = "jmllm joint model report",
    notes: Sequence[str] = (),
    sources: dict[str, str] | None = None,
    max_boxes: int = 20,
) -> str:
    """The report as one HTML string (image embedded, all text escaped).

    Args:
        image: the original image.
        conversation: J's conversation about it.
        detections: J's detections (O^OWL) of the same embedding.
        stock: stock LLaVA's conversation with the same questions, for comparison.
        title: page title.
        notes: short notices shown at the top (e.g. "weights are random").
        sources: model sources to list (``{"owl": …, "llava": …, "alignment": …}``).
        max_boxes: how many detections to draw and list.

    Example:
        >>> page = render_report_html(Image.new("RGB", (8, 8)), notes=["<b>hi</b>"])
        >>> "&lt;b&gt;hi&lt;/b&gt;" in page
        True
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(title)}</title><style>{REPORT_CSS}</style></head><body>",
        f"<h1>{_escape(title)}</h1>",
    ]
    parts += [f'<p class="note">{_escape(note)}</p>' for note in notes]
    figures = [
        f'<figure><img alt="input image" src="{image_data_url(image.convert("RGB"))}">'
        "<figcaption>Input image</figcaption></figure>"
    ]
    if detections is not None:
        drawn = draw_detections(image, detections, max_boxes=max_boxes)
        figures.append(
            f'<figure><img alt="detections" src="{image_data_url(drawn)}">'
            f"<figcaption>Detections (top {min(max_boxes, len(detections))})</figcaption></figure>"
        )
    parts.append('<div class="images">' + "".join(figures) + "</div>")
    if conversation is not None:
        parts.append("<h2>Conversation</h2>")
        answer = conversation.last_answer
        if answer is not None:
            first = get_template(answer.template).first.replace("\n", "⏎")
            parts.append(
                f'<p class="note">Conversation template: {_escape(answer.template)} '
                f"(<code>{_escape(first)}</code>)</p>"
            )
        parts.append(_conversation_html(conversation, stock))
    if detections is not None:
        queries = ", ".join(detections.queries)
        parts.append(
            f"<h2>Detections</h2><p>Queries: {_escape(queries)} — score threshold "
            f"{detections.threshold:g}; boxes in pixels of the original "
            f"{detections.image_size[0]}×{detections.image_size[1]} image.</p>"
        )
        parts.append(_detections_table(detections, max_boxes))
    if sources:
        parts.append("<h2>Models</h2><ul>")
        parts += [f"<li>{_escape(k)}: <code>{_escape(v)}</code></li>" for k, v in sources.items()]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike[str], image: Image.Image, **kwargs: Any) -> Path:
    """Write :func:`render_report_html` to ``path`` atomically; returns the path.

    Example:
        >>> write_report(tmp_path / "report.html", image, conversation=conv,
        ...              detections=dets)  # doctest: +SKIP
    """
    return atomic_write_text(path, render_report_html(image, **kwargs))
