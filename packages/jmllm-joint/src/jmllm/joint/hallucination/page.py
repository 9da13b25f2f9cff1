"""The page of one hallucination check: the answer with its object words marked, the detections
beside it, and each word's GA map and best box a click away (``hallucinations.html``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from jmllm.joint.chat.templates import get_template
from jmllm.joint.hallucination.check import HallucinationReport
from jmllm.joint.render.drawing import (
    LabelLayout,
    LabelledBox,
    draw_labelled_boxes,
    fit_picture,
    hex_colour,
    query_colour,
)
from jmllm.joint.render.explanation import data_url, highlighted_answer, result_panel
from jmllm.joint.render.pages import json_attribute, render
from jmllm.joint.render.report import PAGE_SIDE, atomic_write_bytes, png_bytes


def detections_picture(
    image: Image.Image | None, report: HallucinationReport, max_side: int | None = PAGE_SIDE
) -> tuple[Image.Image, LabelLayout]:
    """The image with the best box of every queried object, each object in its own colour and
    labelled with its score ("not detected" under the threshold), by the shared drawing rules
    (:mod:`jmllm.joint.render.drawing`: enlarged when small, labels legible, inside the picture and
    never over one another)."""
    width, height = report.image_size
    canvas = fit_picture(image, (width, height), max_side=max_side)
    sx, sy = canvas.width / width, canvas.height / height  # boxes are in original pixels
    items = []
    for index, o in enumerate(report.objects.values()):
        x0, y0, x1, y1 = (v * f for v, f in zip(o.box, (sx, sy, sx, sy), strict=True))
        state = "" if o.detected else ", not detected"
        items.append(LabelledBox((x0, y0, x1, y1), f"{o.name} {o.score:.2f}{state}", index))
    # the highest scores' labels are placed first
    order = sorted(range(len(items)), key=lambda i: -list(report.objects.values())[i].score)
    layout = draw_labelled_boxes(canvas, [items[i] for i in order])
    return canvas, layout


def render_hallucination_report(report: HallucinationReport, notes: Sequence[str] = ()) -> str:
    """The self-contained ``hallucinations.html`` page of :func:`write_hallucination_report`,
    as a string (the Jinja2 template ``templates/hallucinations.html``, autoescaped); ``notes``
    are shown at the top (e.g. that the image is not a toy scene).

    Example:
        >>> page = render_hallucination_report(report)  # doctest: +SKIP
    """
    spans, classes, panels = [], {}, []
    for i, m in enumerate(report.mentions):
        key = f"m{i}"
        check = report.objects[m.name]
        spans.append((m.start, m.end, key, f"{m.name}: score {check.score:.3f}"))
        classes[key] = "hit" if check.detected else "miss"
        ga = check.ga
        if ga is None:
            continue
        q = int(ga.meta.get("query_index", 0))
        panel, _, _ = result_panel(key, ga, report.image, "class", m.text, query=q)
        state = "detected" if check.detected else "NOT detected"
        panel["lines"] = [
            f"{m.text}: {state} by OWL-ViT (score {check.score:.3f}, threshold {report.threshold})"
        ]
        panel["table"] = None
        panels.append(panel)
    colours = {name: hex_colour(query_colour(i)) for i, name in enumerate(report.objects)}
    rows = [
        {
            "name": o.name,
            "colour": colours[o.name],
            "mentioned": "yes" if o.mentioned else "no",
            "score": f"{o.score:.3f}",
            "detected": "yes" if o.detected else "no",
        }
        for o in sorted(report.objects.values(), key=lambda o: -o.score)
    ]
    picture, layout = detections_picture(report.image, report)
    return render(
        "hallucinations.html",
        script=True,
        title="Hallucination view",
        notes=list(notes),
        prompt=report.prompt,
        answer=highlighted_answer(report.answer_text, spans, classes),
        missing=", ".join(report.mentioned_not_detected) or "none",
        unmentioned=", ".join(report.detected_not_mentioned) or "none",
        rows=rows,
        threshold=report.threshold,
        template_name=report.template,
        template_first=get_template(report.template).first,
        detections={
            "url": data_url(png_bytes(picture)),
            "labels": json_attribute(layout.to_json()),
            "dropped": layout.dropped,
        },
        panels=panels,
    )


def write_hallucination_report(
    report: HallucinationReport, out_dir: str | os.PathLike[str], notes: Sequence[str] = ()
) -> Path:
    """Write ``hallucinations.html`` (self-contained) and ``hallucinations.json``; ``notes``
    (what may make the answer meaningless, e.g. an image unlike the models' world) head the page
    and are recorded in the JSON.

    Returns:
        the path of the HTML file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**report.to_json(), "notes": list(notes)}
    atomic_write_bytes(out / "hallucinations.json", (json.dumps(record, indent=2) + "\n").encode())
    return atomic_write_bytes(
        out / "hallucinations.html", render_hallucination_report(report, notes).encode()
    )


__all__ = ["detections_picture", "render_hallucination_report", "write_hallucination_report"]
