"""The faithfulness report's pictures: the mean deletion and insertion curves, the cascade, example maps."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jmllm.joint.faithfulness.run import FaithfulnessResult
from jmllm.joint.faithfulness.summary import REFERENCE

# one colour per method, the Okabe–Ito palette (colour-blind safe) then greys
_COLOURS = (
    "#000000", "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#999999", "#666666", "#bbbbbb",
)  # fmt: skip


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """A colour per method, GA's black, in the order given."""
    return {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(methods)}


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curves_png(summary: dict[str, Any]) -> bytes:
    """The mean deletion and insertion curves of every method, one panel per space and curve.

    Example:
        >>> curves_png(summary)[:4] == b"\\x89PNG"  # doctest: +SKIP
        True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = summary["curves"]
    keys = [k for k in curves if k != "fractions"]
    methods = list(summary["settings"]["methods"])
    colours = method_colours(methods)
    # each panel's legend sits under it (its AUCs are the panel's own), clear of the curves
    rows = math.ceil(len(methods) / 2)
    fig = Figure(figsize=(5.2 * max(1, len(keys)) / 1.35, 4.0 + 0.16 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    x = np.asarray(curves["fractions"])
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        space, curve = key.split("/")
        for m in methods:
            value = summary["methods"][m].get(_auc_name(space, curve), {}).get("value")
            label = f"{m} ({value:.3f})" if value is not None else m
            width = 2.4 if m == REFERENCE else 1.3
            ax.plot(x, curves[key][m], label=label, color=colours[m], linewidth=width)
        where = "t" if space == "t" else "pixels"
        ax.set_title(f"{curve} in {where}", fontsize=10)
        ax.set_xlabel("share of patches " + ("removed" if curve == "deletion" else "inserted"))
        ax.set_ylabel("probability of the explained token")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(
            fontsize=7,
            title="method (AUC)",
            title_fontsize=7,
            ncol=2,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            frameon=False,
        )
    return _png(fig)


def _auc_name(space: str, curve: str) -> str:
    return f"{curve}_auc" + ("" if space == "t" else f"_{space}")


def cascade_floor(lowest: float) -> float:
    """The cascade plot's lower limit: -0.25, or below the lowest correlation drawn (Spearman
    reaches -1), so that no point falls off the picture.

    Example:
        >>> cascade_floor(0.1), cascade_floor(-0.28)
        (-0.25, -0.35)
    """
    return min(-0.25, math.floor((lowest - 0.05) * 20) / 20)


def cascade_png(summary: dict[str, Any]) -> bytes:
    """Spearman correlation of every method's map with its map on each randomised stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cascade = summary["cascade"]
    methods = [m for m in summary["settings"]["methods"] if m in cascade]
    colours = method_colours(list(summary["settings"]["methods"]))
    fig = Figure(figsize=(7.5, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if not methods:
        ax.text(0.5, 0.5, "no randomisation cascade in this run", ha="center", va="center")
        return _png(fig)
    stages = ["trained"] + [row["stage"] for row in cascade[methods[0]]]
    lowest = 0.0
    for m in methods:
        values = [1.0] + [row["spearman"]["value"] for row in cascade[m]]
        lowest = min(lowest, *values)
        width = 2.4 if m == REFERENCE else 1.3
        ax.plot(range(len(stages)), values, marker="o", label=m, color=colours[m], linewidth=width)
    ax.set_xticks(range(len(stages)), stages, rotation=30, fontsize=8)
    ax.set_xlabel("randomised so far (cumulative, from W down through the language model)")
    ax.set_ylabel("Spearman with the trained model's map")
    ax.set_ylim(cascade_floor(lowest), 1.05)
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def example_pictures(
    model: Any,
    result: FaithfulnessResult,
    source: Any,
    count: int = 3,
    side: int = 160,
) -> list[tuple[str, bytes]]:
    """Every method's map of the first ``count`` targets of the run, over the image with the
    true boxes, one row per target: ``[(caption, PNG), ...]`` for the page.

    The maps are computed again (the run keeps numbers, not maps) on the trained J with the
    run's settings.
    """
    from PIL import Image, ImageDraw

    from jmllm.joint.render.drawing import BACKGROUND, INK, blend_map, figure
    from jmllm.joint.saliency.attribution import make_methods, prepare_request

    settings = result.settings
    methods = make_methods(
        settings.methods, model, ig_steps=settings.ig_steps, baseline=settings.baseline,
        seed=settings.seed,
    )  # fmt: skip
    items = {item.item_id: item for item in source.items}
    pictures: list[tuple[str, bytes]] = []
    for line in result.lines:
        item = items.get(line["item_id"])
        if item is None or not line["targets"]:
            continue
        emb = model.embed([item.load()])
        truths, _ = source.targets(model, emb, item)
        for truth in truths:
            if len(pictures) >= count:
                return pictures
            request = prepare_request(
                model, emb, source.prompt, truth.target, truth.answer, queries=truth.queries,
                template=source.template, occurrence=truth.occurrence,
            )  # fmt: skip
            image = emb.pil_image(0).resize((side, side), Image.Resampling.BICUBIC)
            sx, sy = side / request.image_size[0], side / request.image_size[1]
            tiles = []
            for name, method in methods.items():
                saliency = method.attribute_request(request).map((side, side))
                tile = blend_map(image, saliency)
                draw = ImageDraw.Draw(tile)
                for x0, y0, x1, y1 in truth.boxes:
                    draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=INK)
                tiles.append(figure(tile, name, font_size=12))
            width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
            height = max(t.height for t in tiles)
            strip = Image.new("RGB", (width, height), BACKGROUND)
            x = 0
            for tile in tiles:
                strip.paste(tile, (x, 0))
                x += tile.width + 4
            buf = io.BytesIO()
            strip.save(buf, format="PNG")
            caption = (
                f"{item.file}: “{request.label}” in “{request.answer_text}” — the "
                f"{truth.name}'s box in black"
            )
            pictures.append((caption, buf.getvalue()))
    return pictures
