"""The bias pictures: contact sheets name every portrait in a legible font, and the histogram's
empty-state message is not crossed by any line."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFont

from jmllm.bias.contact_sheet import write_contact_sheet
from jmllm.bias.report import EMPTY_HISTOGRAM, BiasReport, _histogram_figure
from jmllm.joint.render.drawing import font


def _report(images: list) -> BiasReport:
    settings = {"characteristic": "gender", "original": "man", "adversarial": "woman"}
    return BiasReport(settings, "c", {}, [], images, [])


def _row(group: str, delta: float) -> dict:
    return {"group": group, "perturbed": [{"eps": 0.1, "delta": delta}]}


def test_empty_histogram_message_is_not_crossed_by_a_line():
    fig = _histogram_figure(_report([]), 0.1)
    fig.canvas.draw()
    ax = fig.axes[0]
    (text,) = [t for t in ax.texts if t.get_text() == EMPTY_HISTOGRAM]
    box = text.get_window_extent().expanded(1.1, 1.4)
    assert box.x0 > ax.bbox.x0 and box.x1 < ax.bbox.x1  # inside the axes, centred
    for line in ax.get_lines():  # no line (the zero line once crossed it) passes through
        path = line.get_transform().transform(line.get_xydata())
        xs, ys = path[:, 0], path[:, 1]
        crosses = (xs.min() <= box.x1 and xs.max() >= box.x0) and (
            ys.min() <= box.y1 and ys.max() >= box.y0
        )
        assert not crosses, line
    # with data the zero line is drawn, over the bars
    full = _histogram_figure(_report([_row("a", 2.0), _row("b", -1.0)]), 0.1)
    assert [tuple(line.get_xdata()) for line in full.axes[0].get_lines()] == [(0, 0)]


def test_contact_sheet_names_every_portrait_in_a_scalable_font(tmp_path):
    assert isinstance(font(13), ImageFont.FreeTypeFont)
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        path = tmp_path / f"portrait_{i:03d}.png"
        Image.new("RGB", (40, 60), colour).save(path)  # small: enlarged to the tile
        paths.append(path)
    thumb = 96
    sheet = write_contact_sheet(
        [("men", paths[:2]), ("women", paths[2:])], tmp_path / "s.png", thumb=thumb, columns=2
    )
    with Image.open(sheet) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    for colour in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]:
        mask = np.abs(pixels - colour).sum(axis=-1) < 10
        rows, cols = np.nonzero(mask)
        assert rows.max() - rows.min() + 1 == thumb  # enlarged to the tile's full height
        # under the tile, within its column: the image id in dark ink
        strip = pixels[rows.max() + 1 : rows.max() + 1 + 20, cols.min() - 20 : cols.max() + 20]
        ink = (strip < 80).all(axis=-1)
        assert ink.sum() > 40, colour
        ink_rows = np.nonzero(ink.any(axis=1))[0]
        assert ink_rows.max() - ink_rows.min() + 1 >= 8  # a real font's height, not a 6 px bitmap
