"""The drawing rules every picture follows (labels, colours, overlay opacity, colour bars) and
the HTML pages' escaping, checked on the pixels and the markup themselves."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from jmllm.joint import Detections
from jmllm.joint.render.drawing import (
    MIN_FONT_SIZE,
    PALETTE,
    SPOTLIGHT_DIM,
    LabelledBox,
    blend_map,
    colour_bar,
    contrast_ratio,
    draw_labelled_boxes,
    figure,
    fit_picture,
    font,
    line_width,
    query_colour,
    spotlight,
    text_colour,
    wrap_text,
)
from jmllm.joint.render.explanation import (
    highlighted_answer,
    overlay_image,
    page,
    word_choice_labels,
    word_number,
)
from jmllm.joint.render.pages import render
from jmllm.joint.render.report import draw_detections_layout, render_report_html

HOSTILE = "<script>alert('x')</script>&\"q\""


def _inside(rect, size):
    return 0 <= rect[0] < rect[2] <= size[0] and 0 <= rect[1] < rect[3] <= size[1]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("size", [(128, 96), (320, 240), (640, 480), (3000, 2000)])
def test_labels_stay_inside_never_overlap_and_sit_on_their_colour(size):
    rng = random.Random(sum(size))
    canvas = fit_picture(Image.new("RGB", size, (90, 160, 60)))  # grass green: the old failure
    w, h = canvas.size
    items = []
    for i in range(14):  # crowded, many boxes touching the picture's edges
        x0, y0 = rng.uniform(-0.1, 0.9) * w, rng.uniform(-0.1, 0.9) * h
        box = (x0, y0, x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h)
        items.append(LabelledBox(box, f"query {i % 5} 0.{rng.randrange(10, 99)}", i % 5))
    items.append(LabelledBox((w - 3, h - 3, w + 40, h + 40), "corner", 6))  # outside the edge
    layout = draw_labelled_boxes(canvas, items)
    placed = [r for r in layout.rects if r is not None]
    assert len(placed) + layout.dropped == len(items) and len(placed) >= 4
    for a, b in itertools.combinations(placed, 2):
        assert not _overlap(a, b), (a, b)
    pixels = np.asarray(canvas)
    for rect, item in zip(layout.rects, items, strict=True):
        if rect is None:
            continue
        assert _inside(rect, canvas.size)
        # legible: at least MIN_FONT_SIZE tall, and scaled with the picture
        assert rect[3] - rect[1] >= max(MIN_FONT_SIZE, max(canvas.size) / 40)
        patch = pixels[rect[1] : rect[3], rect[0] : rect[2]].reshape(-1, 3)
        colours = {tuple(p) for p in patch}
        assert item.rgb in colours  # the label's background is its query's colour
        assert text_colour(item.rgb) in colours  # and the text was drawn on it
    # one colour per query: queries 0..4 got five different colours
    assert len({query_colour(i) for i in range(5)}) == 5


def test_every_palette_colour_carries_readable_text():
    for colour in PALETTE:
        assert contrast_ratio(text_colour(colour), colour) >= 4.5, colour


def test_small_images_are_enlarged_before_drawing_and_labels_scale():
    dets = Detections(
        torch.tensor([[0.0, 0.0, 160.0, 120.0], [150.0, 100.0, 320.0, 240.0]]),
        torch.tensor([0.9, 0.8]),
        torch.tensor([0, 1]),
        ["dog", "grass"],
        torch.tensor([0, 1]),
        (320, 240),
    )
    drawn = draw_detections_layout(Image.new("RGB", (320, 240), (90, 160, 60)), dets)
    assert drawn.image.size == (512, 384) and drawn.layout.dropped == 0
    rects = [r for r in drawn.layout.rects if r is not None]
    assert len(rects) == 2 and not _overlap(*rects)
    assert all(r[3] - r[1] >= MIN_FONT_SIZE for r in rects)  # ~9 px before
    big = draw_detections_layout(
        Image.new("RGB", (3200, 2400)),
        dets.__class__(
            dets.boxes * 10, dets.scores, dets.labels, dets.queries, dets.patches, (3200, 2400)
        ),
    )
    assert big.layout.rects[0][3] - big.layout.rects[0][1] > 3 * (rects[0][3] - rects[0][1])
    assert drawn.layout.colours == [query_colour(0), query_colour(1)]


def test_overlay_leaves_the_photo_where_the_weight_is_zero():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB")
    saliency = np.zeros((40, 60), dtype=np.float32)
    saliency[10:20, 30:50] = rng.uniform(0.2, 1.0, (10, 20))
    saliency[0, 0] = np.nan
    out = np.asarray(blend_map(photo, saliency, "jet", alpha=0.6)).astype(np.float64)
    base = np.asarray(photo).astype(np.float64)
    zero = np.nan_to_num(saliency) == 0
    assert np.array_equal(out[zero], base[zero])  # weight 0 (and NaN): the photo, untinted
    # elsewhere the straightforward formula: base·(1 − 0.6 w) + jet(w)·0.6 w
    from matplotlib import colormaps

    w = np.nan_to_num(saliency)[..., None]
    want = base * (1 - 0.6 * w) + colormaps["jet"](w[..., 0])[..., :3] * 255 * 0.6 * w
    assert np.abs(out - want).max() <= 0.5 + 1e-6
    assert np.abs(out[~zero] - base[~zero]).max() > 50  # a real tint where the weight is high
    # overlay_image draws this rule when given a colour map (the WSOL page's evaluation view)
    shown = overlay_image(photo, np.zeros((40, 60)), "jet", shown=(60, 40))
    assert np.array_equal(np.asarray(shown), np.asarray(photo))


def test_spotlight_keeps_the_objects_colours_and_dims_the_rest():
    """The explanations' overlay: the photo's own pixels where the map is 1, a dimmed grey
    (SPOTLIGHT_DIM × luma) where it is 0, linear in between; a white line inside the region at
    half height and a darker edge just outside it; nothing drawn along the picture's border."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), "RGB")
    saliency = np.zeros((64, 96), dtype=np.float32)
    saliency[16:48, 24:72] = 1.0
    saliency[:, 90:] = 0.25  # a low band touching the border: dimmed, never outlined
    out = np.asarray(spotlight(photo, saliency)).astype(np.float64)
    base = np.asarray(photo).astype(np.float64)
    luma = base @ np.array([0.299, 0.587, 0.114])
    width = line_width(photo.size)
    inner = np.zeros_like(saliency, dtype=bool)
    inner[16 + width : 48 - width, 24 + width : 72 - width] = True
    assert np.array_equal(out[inner], base[inner])  # the object's colours, untouched
    far = np.zeros_like(inner)
    far[:, :10] = True
    want = np.repeat((SPOTLIGHT_DIM * luma)[..., None], 3, axis=-1)
    assert np.abs(out[far] - want[far]).max() <= 0.5 + 1e-6
    band = np.zeros_like(inner)
    band[5:60, 92:] = True
    mixed = 0.25 * base + 0.75 * want
    assert np.abs(out[band] - mixed[band]).max() <= 0.5 + 1e-6  # linear, and no line on the border
    line = np.zeros_like(inner)
    line[20:44, 24 : 24 + width] = True  # the region's left edge, inside it
    assert (out[line] == 255).all()
    assert np.array_equal(out[25, 23], np.rint(want[25, 23] * 0.35))  # the dark edge outside
    assert np.array_equal(np.asarray(overlay_image(photo, saliency, shown=(96, 64))), out)


def test_colour_bar_is_under_the_picture_and_its_title_changes_its_pixels():
    picture = Image.new("RGB", (512, 300), (10, 20, 30))
    with_bar = figure(picture, "", ("jet", "GA box-coordinate weight"))
    assert with_bar.width == 512 and with_bar.height > 300
    assert np.array_equal(np.asarray(with_bar)[:300], np.asarray(picture))
    other = figure(picture, "", ("jet", "GA class weight"))
    assert not np.array_equal(np.asarray(other), np.asarray(with_bar))
    bar = np.asarray(colour_bar("jet", 400, "x", 14))
    ink = np.argwhere((bar < 100).all(axis=2))  # black text pixels: the title and the ticks
    assert ink[:, 1].min() >= 0 and ink[:, 1].max() < 400


def test_word_picker_labels_tell_repeated_words_apart():
    text = "a d and d or d"
    numbers = [word_number(text, m.start()) for m in re.finditer(r"\w+", text)]
    assert numbers == [1, 2, 3, 4, 5, 6]
    labels = word_choice_labels(["a", "d", "and", "d", "or", "d"], numbers)
    assert labels == ["a", "d (word 2)", "and", "d (word 4)", "or", "d (word 6)"]
    assert len(set(labels)) == len(labels)


def test_pages_escape_model_text_and_link_the_explanation():
    html = render_report_html(
        Image.new("RGB", (32, 32)),
        title=HOSTILE,
        notes=[HOSTILE],
        links=[(HOSTILE, "explanation/report.html")],
        sources={"llava": HOSTILE},
    )
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)" in html
    assert re.search(r'<a href="explanation/report\.html">[^<]*&lt;script', html)
    body = highlighted_answer(HOSTILE + " cat", [(len(HOSTILE) + 1, len(HOSTILE) + 4, "r0", "t")])
    assert "<script>" not in body and "data-k='r0'" in body
    assert "<script>alert" not in page(HOSTILE, "<p>ok</p>") and "<p>ok</p>" in page(
        "t", "<p>ok</p>"
    )
    # a template variable is escaped even inside an attribute
    assert "<script>alert" not in render("base.html", title=HOSTILE, narrow=False)


@pytest.mark.parametrize(
    "name",
    [
        "render.drawing",
        "render.pages",
        "render.explanation",
        "render.explanation_pictures",
        "render.object_explanation",
        "wsol.page",
        "render.report",
    ],
)
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"jmllm.joint.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, name


def test_a_long_colour_bar_title_wraps_instead_of_being_cut():
    """A map's bar title says which channel and which scale: cut at the picture's edge it lost
    the scale ("0: med…"); it wraps now, every word kept, every line inside the picture."""
    title = (
        "GA class weight, query “triangle” (matching: phrase head 'triangle'); "
        "0: median patch, 1: top patch"
    )
    face = font(MIN_FONT_SIZE)
    lines = wrap_text(title, face, 512)
    assert " ".join(lines) == title and len(lines) == 2
    assert all(face.getlength(line) <= 512 for line in lines)
    assert colour_bar("gray", 512, title).height > colour_bar("gray", 512, "GA class").height
    many = wrap_text(" ".join(["word"] * 200), face, 100, max_lines=2)
    assert len(many) == 2 and many[-1].endswith("…")  # beyond max_lines: says so
