"""The HTML page of a WSOL run: the metric, its curves, and a sample of maps with their boxes.

``jmllm-joint wsol DATA_DIR --json-out FILE.json`` writes this page beside its JSON
(``FILE.html``); :meth:`jmllm.joint.wsol.WsolReport.save_page` writes it from Python. The page
is the Jinja2 template ``templates/wsol.html`` (autoescaped, self-contained: pictures are
``data:`` URLs): MaxBoxAccV2 of GA beside the plain-gradient baseline with BoxAcc and the best τ
at each IoU threshold δ, BoxAcc against τ, and for each sampled image its GA and baseline maps
over the image with the ground-truth boxes and the predicted box of best IoU at the best τ
(:mod:`jmllm.joint.render.drawing`'s rules: one colour per box kind, labels inside the picture, never
over one another).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from jmllm.joint.render.drawing import (
    LabelledBox,
    blend_map,
    colour_bar,
    draw_labelled_boxes,
    hex_colour,
    query_colour,
)
from jmllm.joint.render.explanation import data_url, map_title
from jmllm.joint.render.pages import json_attribute, render
from jmllm.joint.render.report import png_bytes

METHOD_NAMES = {"ga": "GA", "gradient": "plain gradient"}
# one colour per box kind (palette indices), the same in the table, the curves and the pictures
COLOURS = {"ga": 5, "gradient": 4, "ground truth": 3}
MAP_CMAP = "jet"

__all__ = ["map_file_name", "render_wsol_page", "wsol_page_parts"]


# What the page reads of :class:`jmllm.joint.wsol.WsolReport`, :class:`~jmllm.joint.wsol.WsolSample`
# and :class:`~jmllm.joint.wsol.BoxAccuracy`. Described here rather than imported: the report
# writes its page (``WsolReport.save_page``), so this module must not import the report's.
class _Accuracy(Protocol):
    @property
    def value(self) -> float: ...
    @property
    def per_iou(self) -> Mapping[float, float]: ...
    @property
    def best_threshold(self) -> Mapping[float, float]: ...
    @property
    def curve(self) -> Mapping[float, Sequence[float]]: ...
    @property
    def thresholds(self) -> Sequence[float]: ...


class WsolSample(Protocol):
    @property
    def image_id(self) -> str: ...
    @property
    def picture(self) -> Any: ...
    @property
    def map_size(self) -> tuple[int, int]: ...
    @property
    def gt_boxes(self) -> Any: ...
    @property
    def maps(self) -> Mapping[str, Any]: ...
    @property
    def best(self) -> Mapping[str, Any]: ...
    def at(self, method: str, tau_index: int) -> tuple[list[int], float]: ...


class WsolReport(Protocol):
    @property
    def results(self) -> Mapping[str, _Accuracy]: ...
    @property
    def num_images(self) -> int: ...
    @property
    def skipped(self) -> Mapping[str, str]: ...
    @property
    def setting(self) -> Mapping[str, Any]: ...
    @property
    def samples(self) -> Sequence[WsolSample]: ...
    @property
    def sample_iou_threshold(self) -> float: ...


def _method_name(report: WsolReport, method: str) -> str:
    if method == "ga":
        return f"GA ({report.setting.get('weighting', 'class')})"
    return METHOD_NAMES.get(method, method)


def _curve_png(report: WsolReport) -> bytes:
    """BoxAcc against τ, one panel per δ, GA and the baseline in their colours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    deltas = sorted(next(iter(report.results.values())).per_iou)
    fig = Figure(figsize=(3.2 * len(deltas), 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(deltas), sharey=True, squeeze=False)[0]
    for ax, delta in zip(axes, deltas, strict=True):
        for method, result in report.results.items():
            colour = [c / 255 for c in query_colour(COLOURS.get(method, 0))]
            ax.plot(
                result.thresholds,
                result.curve[delta],
                color=colour,
                label=_method_name(report, method),
            )
            best = result.best_threshold[delta]
            ax.plot([best], [result.per_iou[delta]], "o", color=colour)
        ax.set_title(f"IoU ≥ {delta:g}")
        ax.set_xlabel("map threshold τ")
        ax.set_xlim(0, 1)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("BoxAcc (%)")
    axes[-1].legend(loc="upper right", fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def map_file_name(index: int, image_id: str, method: str) -> str:
    """The file name of a sampled image's map picture (``FILE_maps/`` beside the page): its
    place in the sample, its id made safe for a file name, the method.

    Example:
        >>> map_file_name(3, "001.Black_footed_Albatross/Albatross_0031.jpg", "ga")
        '03_001_Black_footed_Albatross_Albatross_0031_jpg_ga.png'
    """
    safe = re.sub(r"[^A-Za-z0-9]+", "_", image_id).strip("_")[:80] or "image"
    return f"{index:02d}_{safe}_{method}.png"


def _view(
    report: WsolReport, sample: WsolSample, method: str, delta: float
) -> dict[str, Any] | None:
    """One sample picture: the method's map over the image, its predicted box and the truth."""
    result = report.results.get(method)
    if result is None or method not in sample.best:
        return None
    tau = result.best_threshold[delta]
    box, iou = sample.at(method, result.thresholds.index(tau))
    picture = blend_map(sample.picture, sample.maps[method], MAP_CMAP)
    sx = picture.width / sample.map_size[0]
    sy = picture.height / sample.map_size[1]

    def scaled(b: Any) -> tuple[float, float, float, float]:
        # inclusive pixel boxes of the map: the last pixel's far edge is x1 + 1
        return (b[0] * sx, b[1] * sy, (b[2] + 1) * sx, (b[3] + 1) * sy)

    name = _method_name(report, method)
    items = [LabelledBox(scaled(box), f"{name}: IoU {iou:.2f}", COLOURS.get(method, 0))]
    items += [
        LabelledBox(scaled(gt), "ground truth", COLOURS["ground truth"]) for gt in sample.gt_boxes
    ]
    layout = draw_labelled_boxes(picture, items)
    verdict = "correct" if iou >= delta else "not correct"
    caption = (
        f"{name}: best IoU {iou:.2f} at τ = {tau:g}, {verdict} at IoU ≥ {delta:g}"
        + (
            f"; {layout.dropped} label(s) not drawn where they would cover another"
            if layout.dropped
            else ""
        )
        + "."
    )
    png = png_bytes(picture)
    return {
        "method": method,
        "png": png,
        "alt": f"{name} map",
        "url": data_url(png),
        "labels": json_attribute(layout.to_json()),
        "caption": caption,
    }


def render_wsol_page(report: WsolReport) -> str:
    """The WSOL page of ``report`` as one self-contained HTML string.

    Args:
        report: a :func:`~jmllm.joint.wsol.run_wsol` report (its ``samples`` are drawn).

    Returns:
        The HTML text.

    Example:
        >>> report = run_wsol(model, "CUB_test/")  # doctest: +SKIP
        >>> "MaxBoxAccV2" in render_wsol_page(report)  # doctest: +SKIP
        True
    """
    return wsol_page_parts(report)[0]


def wsol_page_parts(report: WsolReport) -> tuple[str, dict[str, bytes]]:
    """The WSOL page of ``report`` and its sample pictures, drawn once.

    Args:
        report: a :func:`~jmllm.joint.wsol.run_wsol` report.

    Returns:
        The HTML text, and file name (:func:`map_file_name`) → PNG bytes of every sample
        picture the page shows (each map over its image with the boxes and IoUs).

    Example:
        >>> html, pictures = wsol_page_parts(report)  # doctest: +SKIP
        >>> sorted(pictures)[:2]  # doctest: +SKIP
        ['00_0_png_ga.png', '00_0_png_gradient.png']
    """
    deltas = sorted(next(iter(report.results.values())).per_iou)
    metric = [
        {
            "name": _method_name(report, method),
            "colour": hex_colour(query_colour(COLOURS.get(method, 0))),
            "value": f"{result.value:.1f}",
            "cells": [
                {"accuracy": f"{result.per_iou[d]:.1f}", "tau": f"{result.best_threshold[d]:g}"}
                for d in deltas
            ],
        }
        for method, result in report.results.items()
    ]
    delta = report.sample_iou_threshold
    samples = []
    pictures: dict[str, bytes] = {}
    for index, sample in enumerate(report.samples):
        views = [v for v in (_view(report, sample, m, delta) for m in report.results) if v]
        for view in views:
            pictures[map_file_name(index, sample.image_id, view["method"])] = view.pop("png")
        samples.append({"image_id": sample.image_id, "views": views})
    map_size = report.setting.get("map_size", "original")
    weighting = str(report.setting.get("weighting", "class"))
    bar = colour_bar(
        MAP_CMAP, 480, f"map value ({map_title(weighting)}; plain gradient: normalised)", 14
    )
    page = render(
        "wsol.html",
        title="WSOL check: MaxBoxAccV2 of GA maps",
        num_images=report.num_images,
        skipped=report.skipped,
        setting=report.setting,
        map_size=(
            f"{map_size[0]} × {map_size[1]} px"
            if isinstance(map_size, list)
            else "at each image's own size"
        ),
        deltas=[f"{d:g}" for d in deltas],
        metric=metric,
        curve=data_url(_curve_png(report)),
        samples=samples,
        sample_delta=f"{delta:g}",
        bar=data_url(png_bytes(bar)),
    )
    return page, pictures
