"""Rendering: detections drawn on the image (PNG) and a self-contained HTML report.

The report holds the image (embedded as a ``data:`` URL, so the file can be mailed or opened
anywhere), the conversation, J's detections drawn on the image and a table of them, and,
optionally, stock LLaVA's answers beside J's. The page is the Jinja2 template
``templates/report.html`` with autoescaping: a model that answers ``<script>`` shows that text, it
does not run it (DESIGN §6). Detections follow the shared drawing rules of
:mod:`jmllm.joint.render.drawing` (one colour per query, labels that are legible, never clipped and never
overlapping).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from jmllm.align import files
from jmllm.align.images import box_scale
from jmllm.joint.chat.templates import Conversation, get_template
from jmllm.joint.detection.heads import Detections
from jmllm.joint.render.drawing import (
    PALETTE,
    LabelLayout,
    LabelledBox,
    draw_labelled_boxes,
    fit_picture,
    hex_colour,
    query_colour,
)
from jmllm.joint.render.pages import json_attribute, render

PAGE_SIDE = 1024  # pictures embedded in a page are at most this large (longer side)


def label_colour(label: int) -> tuple[int, int, int]:
    """The drawing colour of query ``label`` (:func:`jmllm.joint.render.drawing.query_colour`)."""
    return query_colour(label)


@dataclass
class DrawnDetections:
    """A picture of detections and where its labels went.

    Attributes:
        image: the RGB picture.
        layout: the labels' :class:`~jmllm.joint.render.drawing.LabelLayout` (``layout.dropped``
            labels found no free place and were left out; their boxes are drawn).
        shown: how many detections were drawn.
    """

    image: Image.Image
    layout: LabelLayout
    shown: int


def draw_detections_layout(
    image: Image.Image,
    detections: Detections,
    max_boxes: int = 20,
    width: int | None = None,
    max_side: int | None = None,
) -> DrawnDetections:
    """:func:`draw_detections`, with the label layout (see :class:`DrawnDetections`)."""
    # the image may be the working copy of a larger original (boxes are in original pixels)
    box_scale(detections.image_size, image.size)  # refuses a picture of another image
    canvas = fit_picture(image, max_side=max_side)
    sx = canvas.width / detections.image_size[0]
    sy = canvas.height / detections.image_size[1]
    items = [
        LabelledBox(
            (float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy),
            f"{detections.queries[int(label)]} {float(score):.2f}",
            int(label),
        )
        for box, score, label in list(
            zip(detections.boxes, detections.scores, detections.labels, strict=True)
        )[:max_boxes]
    ]
    layout = draw_labelled_boxes(canvas, items, width=width)
    return DrawnDetections(canvas, layout, len(items))


def draw_detections(
    image: Image.Image,
    detections: Detections,
    max_boxes: int = 20,
    width: int | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """A picture of ``image`` with the top ``max_boxes`` detections drawn and labelled.

    The drawing rules are :mod:`jmllm.joint.render.drawing`'s: a small image is enlarged to 512 px (its
    longer side) first, labels are sized to the picture, sit on a box of their query's colour
    (one colour per query), never leave the picture and never cover one another (a label with no
    free place is left out; :func:`draw_detections_layout` says how many).

    Args:
        image: the original image, or a uniformly scaled copy of it (the working copy of a large
            photo): boxes, in original pixels, are scaled to it.
        detections: from :meth:`JointModel.detect`, highest score first.
        max_boxes: how many boxes to draw.
        width: line width in pixels (default: scaled to the picture size).
        max_side: shrink the picture to at most this many pixels (longer side); default: the
            image's own size (a small image is still enlarged).

    Returns:
        An RGB PIL image.

    Example:
        >>> import torch
        >>> d = Detections(torch.tensor([[2., 2., 20., 20.]]), torch.tensor([0.9]),
        ...                torch.tensor([0]), ["cat"], torch.tensor([0]), (32, 32))
        >>> draw_detections(Image.new("RGB", (32, 32)), d).size
        (512, 512)
    """
    return draw_detections_layout(image, detections, max_boxes, width, max_side).image


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


def _conversation_rows(
    conversation: Conversation, stock: Conversation | None
) -> list[tuple[str, str]]:
    rows = []
    for i, turn in enumerate(conversation.turns):
        rows.append(("User", turn.question))
        rows.append(("J", turn.answer or ""))
        if stock is not None and i < len(stock.turns):
            rows.append(("Stock LLaVA", stock.turns[i].answer or ""))
    return rows


def _detection_rows(detections: Detections, max_rows: int) -> list[dict[str, Any]]:
    rows = []
    for record in detections.to_records()[:max_rows]:
        rows.append(
            {
                "label": record["label"],
                "colour": hex_colour(label_colour(detections.queries.index(record["label"]))),
                "score": f"{record['score']:.3f}",
                "box": ", ".join(f"{v:.1f}" for v in record["box"]),
                "patch": record["patch"],
                # OWLv2's objectness (OWL-ViT has none: no column)
                "objectness": f"{record['objectness']:.3f}" if "objectness" in record else "",
            }
        )
    return rows


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
    links: Sequence[tuple[str, str]] = (),
) -> str:
    """The report as one HTML string (pictures embedded, all text escaped).

    Args:
        image: the original image (or its working copy).
        conversation: J's conversation about it.
        detections: J's detections (O^OWL) of the same embedding.
        stock: stock LLaVA's conversation with the same questions, for comparison.
        title: page title.
        notes: short notices shown at the top (e.g. "weights are random").
        sources: model sources to list (``{"owl": …, "llava": …, "alignment": …}``).
        max_boxes: how many detections to draw and list.
        links: ``(text, relative path)`` links shown under the notes (e.g. to the explanation
            page written beside this one).

    Example:
        >>> page = render_report_html(Image.new("RGB", (8, 8)), notes=["<b>hi</b>"])
        >>> "&lt;b&gt;hi&lt;/b&gt;" in page
        True
    """
    drawn = None
    if detections is not None:
        picture = draw_detections_layout(image, detections, max_boxes, max_side=PAGE_SIDE)
        drawn = {
            "url": image_data_url(picture.image),
            "labels": json_attribute(picture.layout.to_json()),
            "shown": picture.shown,
            "total": len(detections),
            "dropped": picture.layout.dropped,
        }
    template_name = template_first = None
    if conversation is not None and conversation.last_answer is not None:
        template_name = conversation.last_answer.template
        template_first = get_template(template_name).first.replace("\n", "⏎")
    table = None
    if detections is not None:
        table = {
            "queries": ", ".join(detections.queries),
            "threshold": f"{detections.threshold:g}",
            "size": detections.image_size,
            "rows": _detection_rows(detections, max_boxes),
            "more": len(detections) - max_boxes,
            "objectness": detections.objectness is not None,  # OWLv2: its column
        }
    original = detections.image_size if detections is not None else image.size
    return render(
        "report.html",
        title=title,
        narrow=True,
        notes=list(notes),
        links=list(links),
        image_url=image_data_url(fit_picture(image, max_side=PAGE_SIDE)),
        image_size=original,
        drawn=drawn,
        conversation=_conversation_rows(conversation, stock) if conversation is not None else None,
        template_name=template_name,
        template_first=template_first,
        detections=table,
        sources=sources or {},
    )


def write_report(path: str | os.PathLike[str], image: Image.Image, **kwargs: Any) -> Path:
    """Write :func:`render_report_html` to ``path`` atomically; returns the path.

    Example:
        >>> write_report(tmp_path / "report.html", image, conversation=conv,
        ...              detections=dets)  # doctest: +SKIP
    """
    return atomic_write_text(path, render_report_html(image, **kwargs))


__all__ = [
    "PALETTE",
    "DrawnDetections",
    "atomic_write_bytes",
    "atomic_write_text",
    "draw_detections",
    "draw_detections_layout",
    "image_data_url",
    "label_colour",
    "png_bytes",
    "render_report_html",
    "save_png",
    "write_report",
]
