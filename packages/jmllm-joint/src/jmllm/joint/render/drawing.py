"""The drawing rules every jmllm picture follows, written once so that every picture agrees.

- **Size** (:func:`picture_size`, :func:`fit_picture`): a picture is drawn at least
  :data:`MIN_SIDE` pixels on its longer side — small images, such as 128 px synthetic scenes, are
  enlarged *before* anything is drawn on them, so lines and labels stay sharp and legible — and at
  most ``max_side`` when a page asks for a bound.
- **Text** (:func:`font`, :func:`label_font_size`): DejaVu Sans (shipped with matplotlib), or
  Pillow's own scalable font, at a size that follows the picture; never the bitmap font.
- **Colour** (:data:`PALETTE`, :func:`query_colour`, :func:`text_colour`): one colour per query
  from the colour-blind-safe Okabe–Ito palette; text on a colour is black or white, whichever
  contrasts more (WCAG 2 contrast ratio, :func:`contrast_ratio`; every palette colour reaches
  4.5, the AA level for text).
- **Labels** (:func:`draw_labelled_boxes`): every label sits on a box of its colour; labels are
  placed greedily in priority order (above the box, inside its top, below it, inside its bottom;
  left- then right-aligned), moved inside the picture so none is ever clipped, and never over
  another label: a label with no free place is dropped, and counted.
- **Maps** (:func:`spotlight`): an explanation is read off the photo itself. Where the map is 1
  the photo's pixels are left exactly as they are, so the objects keep their colours; where it is
  0 the photo is dimmed to a dark grey; a white line (with a dark edge, visible on any
  background) surrounds the region at half the map's height. The bar under such a picture
  (:data:`SPOTLIGHT`) goes from that dark grey to white. :func:`blend_map` (a colour map over the
  image, its opacity following the weight) is kept for the evaluation pages, which show a map's
  raw values as the metric thresholds them.
- **Colour bars and figures** (:func:`colour_bar`, :func:`figure`): a horizontal bar titled by what
  it shows, under the picture.

Example:
    >>> from PIL import Image
    >>> canvas = fit_picture(Image.new("RGB", (128, 96), "white"))
    >>> canvas.size
    (512, 384)
    >>> layout = draw_labelled_boxes(canvas, [LabelledBox((40, 40, 200, 200), "cat 0.91", 0)])
    >>> layout.dropped, layout.rects[0][1] >= 0
    (0, True)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

MIN_SIDE = 512  # small images are enlarged to this (longer side) before anything is drawn
LABEL_SCALE = 40  # label font size = longer side / LABEL_SCALE, at least MIN_FONT_SIZE
MIN_FONT_SIZE = 13
OVERLAY_ALPHA = 0.6  # opacity of a map where its weight is 1 (0 where it is 0)
BACKGROUND: RGB = (255, 255, 255)
INK: RGB = (0, 0, 0)
NO_IMAGE: RGB = (128, 128, 128)  # the background of maps explained from t alone
SPOTLIGHT = "spotlight"  # the bar of spotlight pictures (a ramp, not a matplotlib colour map)
SPOTLIGHT_DIM = 0.3  # brightness (of the grey level) left where a spotlight map is 0
SPOTLIGHT_LINE = 0.5  # the outlined level of a spotlight map

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision
# deficiency. One colour per query, in query order; beyond eight queries the colours repeat.
PALETTE: tuple[RGB, ...] = (
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 158, 115),  # bluish green
    (240, 228, 66),  # yellow
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
    (0, 0, 0),  # black
)


def query_colour(index: int) -> RGB:
    """The colour of query ``index`` (one colour per query; :data:`PALETTE` in order).

    Example:
        >>> query_colour(0), query_colour(8) == query_colour(0)
        ((230, 159, 0), True)
    """
    return PALETTE[int(index) % len(PALETTE)]


def hex_colour(colour: Sequence[int]) -> str:
    """``#rrggbb`` of an RGB colour.

    Example:
        >>> hex_colour((230, 159, 0))
        '#e69f00'
    """
    r, g, b = (int(c) for c in colour[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def relative_luminance(colour: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0–255 channels).

    Example:
        >>> relative_luminance((255, 255, 255)), relative_luminance((0, 0, 0))
        (1.0, 0.0)
    """
    channels = [float(c) / 255 for c in colour[:3]]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG 2 contrast ratio of two colours, 1 to 21 (4.5 is the AA level for text).

    Example:
        >>> round(contrast_ratio((0, 0, 0), (255, 255, 255)), 1)
        21.0
    """
    high, low = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def text_colour(background: Sequence[int]) -> RGB:
    """Black or white, whichever contrasts more with ``background``.

    Example:
        >>> text_colour((0, 114, 178)), text_colour((240, 228, 66))
        ((255, 255, 255), (0, 0, 0))
    """
    white, black = (255, 255, 255), (0, 0, 0)
    return white if contrast_ratio(white, background) > contrast_ratio(black, background) else black


@functools.lru_cache(maxsize=64)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """A scalable sans-serif font of ``size`` pixels: DejaVu Sans from matplotlib's fonts, or
    Pillow's own scalable default when matplotlib's cannot be opened (never the bitmap font).

    Example:
        >>> font(16).size
        16
    """
    size = max(1, int(size))
    try:
        from matplotlib import font_manager

        props = font_manager.FontProperties(
            family="DejaVu Sans", weight="bold" if bold else "normal"
        )
        return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=True), size)
    except Exception:  # no matplotlib font: Pillow's bundled scalable font (FreeType)
        face = ImageFont.load_default(size=size)
        if not isinstance(face, ImageFont.FreeTypeFont):
            raise RuntimeError("Pillow was built without FreeType: no scalable font") from None
        return face


def label_font_size(canvas_size: tuple[int, int]) -> int:
    """The label font size of a picture: its longer side / :data:`LABEL_SCALE`, at least
    :data:`MIN_FONT_SIZE` (a picture shown about 600 px wide keeps labels near 15 px).

    Example:
        >>> label_font_size((512, 384)), label_font_size((1024, 768)), label_font_size((4096, 2731))
        (13, 26, 102)
    """
    return max(MIN_FONT_SIZE, round(max(canvas_size) / LABEL_SCALE))


def line_width(canvas_size: tuple[int, int]) -> int:
    """Box outline width of a picture, following its size.

    Example:
        >>> line_width((512, 384)), line_width((4096, 2731))
        (2, 16)
    """
    return max(2, round(max(canvas_size) / 256))


def picture_size(
    size: tuple[int, int], max_side: int | None = None, min_side: int = MIN_SIDE
) -> tuple[int, int]:
    """(width, height) at which an image of ``size`` is drawn, aspect kept: enlarged to
    ``min_side`` on its longer side when smaller, shrunk to ``max_side`` when larger.

    Example:
        >>> picture_size((128, 128)), picture_size((4000, 3000), 1024), picture_size((800, 600))
        ((512, 512), (1024, 768), (800, 600))
    """
    width, height = (max(1, int(v)) for v in size)
    longest = max(width, height)
    scale = max(1.0, min_side / longest)
    if max_side is not None:
        scale = min(scale, max_side / longest)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_picture(
    image: Image.Image | None,
    size: tuple[int, int] | None = None,
    shown: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """A fresh RGB copy of ``image`` at its drawing size (:func:`picture_size`, or exactly
    ``shown``); grey (:data:`NO_IMAGE`) of ``size`` when there is no image (explained from ``t``).

    Example:
        >>> fit_picture(None, (32, 16)).size, fit_picture(Image.new("L", (64, 64))).mode
        ((512, 256), 'RGB')
    """
    if image is None:
        if size is None:
            raise ValueError("size: needed when there is no image")
        base = Image.new("RGB", (max(1, size[0]), max(1, size[1])), NO_IMAGE)
    else:
        base = image.convert("RGB")
    shown = shown or picture_size(size or base.size, max_side)
    if base.size == shown:
        return base.copy()
    # a grey background is resized for free: it has no detail to resample
    if image is None:
        return Image.new("RGB", shown, NO_IMAGE)
    return base.resize(shown, Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelledBox:
    """A box to draw with its label.

    Attributes:
        box: x0, y0, x1, y1 in the canvas's pixels.
        text: the label.
        colour: an RGB colour, or a query index (its :func:`query_colour`).
        label: False draws the box without a label.
    """

    box: tuple[float, float, float, float]
    text: str
    colour: RGB | int
    label: bool = True

    @property
    def rgb(self) -> RGB:
        return query_colour(self.colour) if isinstance(self.colour, int) else self.colour


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive


@dataclass
class LabelLayout:
    """Where the labels of :func:`draw_labelled_boxes` went.

    Attributes:
        rects: per box, its label's rectangle ``x0, y0, x1, y1`` (end exclusive) in the canvas's
            pixels, or None when it was dropped (no free place) or not asked for.
        texts: the label text drawn (shortened with "…" when wider than the picture).
        colours: per box, the label's background (the box's colour); text_colours: its text.
        dropped: how many asked-for labels found no free place.
        canvas_size: (width, height) of the picture.
    """

    rects: list[Rect | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    colours: list[RGB] = field(default_factory=list)
    text_colours: list[RGB] = field(default_factory=list)
    dropped: int = 0
    canvas_size: tuple[int, int] = (0, 0)

    def to_json(self) -> list[dict[str, Any]]:
        """The placed labels, for a page's ``data-labels`` attribute (layout tests read it).

        Example:
            >>> LabelLayout([(0, 0, 4, 2)], ["a"], [(0, 0, 0)], [(255, 255, 255)]).to_json()
            [{'rect': [0, 0, 4, 2], 'text': 'a', 'background': '#000000', 'colour': '#ffffff'}]
        """
        return [
            {"rect": list(r), "text": t, "background": hex_colour(bg), "colour": hex_colour(fg)}
            for r, t, bg, fg in zip(
                self.rects, self.texts, self.colours, self.text_colours, strict=True
            )
            if r is not None
        ]


def _intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def fit_text(text: str, face: Any, limit: float) -> str:
    """``text``, shortened with "…" until it is at most ``limit`` pixels wide in ``face``.

    Example:
        >>> fit_text("a rather long label", font(13), 60)
        'a rathe…'
    """
    if face.getlength(text) <= limit:
        return text
    while text and face.getlength(text + "…") > limit:
        text = text[:-1]
    return text + "…" if text else ""


def wrap_text(text: str, face: Any, limit: float, max_lines: int = 3) -> list[str]:
    """``text`` broken at spaces into lines at most ``limit`` pixels wide in ``face``; a word
    wider than a line, or text beyond ``max_lines``, is shortened with "…" (:func:`fit_text`).

    Example:
        >>> wrap_text("GA class weight, query 'cross'; 0: median patch", font(13), 200)
        ["GA class weight, query 'cross';", '0: median patch']
    """
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and face.getlength(f"{line} {words[0]}") <= limit:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:  # more than max_lines: the last line says so
        lines[-1] = fit_text(f"{lines[-1]} {' '.join(words)}", face, limit)
    return [fit_text(line, face, limit) for line in lines]


def place_label(
    box: Sequence[float], size: tuple[int, int], canvas: tuple[int, int], taken: Sequence[Rect]
) -> Rect | None:
    """The first free place for a ``size`` label of ``box``: above it, inside its top, below
    it, inside its bottom (left-aligned, then right-aligned), each moved inside the ``canvas``;
    None when every place overlaps a rectangle of ``taken`` (or the label is larger than the
    canvas).

    Example:
        >>> place_label((10, 0, 60, 40), (30, 12), (100, 100), [])  # no room above: inside
        (10, 0, 40, 12)
        >>> place_label((10, 0, 60, 40), (30, 12), (100, 100), [(10, 0, 40, 12)])  # taken: below
        (10, 40, 40, 52)
    """
    width, height = size
    canvas_w, canvas_h = canvas
    if width > canvas_w or height > canvas_h:
        return None
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    seen = set()
    for y in (y0 - height, y0, y1, y1 - height):
        for x in (x0, x1 - width):
            cx = min(max(x, 0), canvas_w - width)
            cy = min(max(y, 0), canvas_h - height)
            rect = (cx, cy, cx + width, cy + height)
            if rect in seen:
                continue
            seen.add(rect)
            if not any(_intersects(rect, other) for other in taken):
                return rect
    return None


def draw_labelled_boxes(
    canvas: Image.Image,
    items: Sequence[LabelledBox],
    width: int | None = None,
    font_size: int | None = None,
) -> LabelLayout:
    """Draw boxes and their labels on ``canvas`` (in place), the first item first in priority.

    Boxes are outlined in their colour (the first item on top); each label is its text on a box
    of the same colour, in black or white by contrast, placed by :func:`place_label` so that no
    label leaves the picture or covers another. Labels with no free place are dropped and
    counted.

    Args:
        canvas: an RGB picture, already at its drawing size (:func:`fit_picture`).
        items: the boxes, highest priority first (e.g. highest score first).
        width: outline width (default :func:`line_width`).
        font_size: label size (default :func:`label_font_size`).

    Returns:
        :class:`LabelLayout`.

    Example:
        >>> canvas = Image.new("RGB", (512, 512), "white")
        >>> boxes = [LabelledBox((50, 50, 90, 90), "cat", 0), LabelledBox((52, 52, 92, 92), "dog", 1)]
        >>> layout = draw_labelled_boxes(canvas, boxes)
        >>> layout.dropped, layout.rects[0] != layout.rects[1]
        (0, True)
    """
    size = canvas.size
    draw = ImageDraw.Draw(canvas)
    line = width or line_width(size)
    face = font(font_size or label_font_size(size))
    ascent, descent = face.getmetrics()
    pad = max(2, round((ascent + descent) / 6))
    layout = LabelLayout(canvas_size=size)
    for item in reversed(items):
        x0, y0, x1, y1 = (float(v) for v in item.box)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=item.rgb, width=line)
    taken: list[Rect] = []
    for item in items:
        background, ink = item.rgb, text_colour(item.rgb)
        text = fit_text(" ".join(item.text.split()), face, size[0] - 2 * pad)
        rect = None
        if item.label and text:
            label_size = (round(face.getlength(text)) + 2 * pad, ascent + descent + 2 * pad)
            rect = place_label(item.box, label_size, size, taken)
            if rect is None:
                layout.dropped += 1
            else:
                taken.append(rect)
                draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=background)
                draw.text((rect[0] + pad, rect[1] + pad), text, fill=ink, font=face)
        layout.rects.append(rect)
        layout.texts.append(text)
        layout.colours.append(background)
        layout.text_colours.append(ink)
    return layout


# ---------------------------------------------------------------------------------- maps


def blend_map(
    base: Image.Image, saliency: np.ndarray, cmap: str = "jet", alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """``saliency`` (H, W), in [0, 1], over ``base`` with an opacity that follows the weight:
    ``alpha × weight``. Weight 0 leaves the photo's pixels exactly; weight 1 is ``alpha`` of
    the colour map. The map is resized (bilinear) to the picture; NaN counts as 0.

    Example:
        >>> base = Image.new("RGB", (8, 8), (10, 200, 30))
        >>> blend_map(base, np.zeros((4, 4))).getpixel((0, 0))
        (10, 200, 30)
    """
    from matplotlib import colormaps

    picture = base.convert("RGB")
    weights = np.nan_to_num(np.asarray(saliency, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if weights.shape != (picture.height, picture.width):
        weights = np.asarray(
            Image.fromarray(weights, "F").resize(picture.size, Image.Resampling.BILINEAR)
        )
    weights = np.clip(weights, 0.0, 1.0)[..., None]  # (h, w, 1)
    colours = colormaps[cmap](weights[..., 0])[..., :3].astype(np.float32) * 255  # (h, w, 3)
    opacity = np.float32(alpha) * weights
    pixels = np.asarray(picture, dtype=np.float32)
    blended = pixels * (1 - opacity) + colours * opacity
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")


def spotlight(base: Image.Image, shown: np.ndarray) -> Image.Image:
    """``base`` lit by a map ``shown`` (H, W) in [0, 1]: the photo's own pixels where the map is 1
    (objects keep their colours), a dimmed grey where it is 0, linear in between, and a white
    line with a dark edge around the region where the map reaches :data:`SPOTLIGHT_LINE`.
    The map is resized (bilinear) to the picture; NaN counts as 0.

    Example:
        >>> base = Image.new("RGB", (32, 32), (200, 40, 40))
        >>> lit = np.zeros((32, 32)); lit[:, 16:] = 1.0
        >>> picture = spotlight(base, lit)
        >>> picture.getpixel((30, 8)), picture.getpixel((16, 8)), picture.getpixel((2, 8))
        ((200, 40, 40), (255, 255, 255), (26, 26, 26))
    """
    picture = base.convert("RGB")
    w = np.nan_to_num(np.asarray(shown, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if w.shape != (picture.height, picture.width):
        w = np.asarray(Image.fromarray(w, "F").resize(picture.size, Image.Resampling.BILINEAR))
    w = np.clip(w, 0.0, 1.0)
    pixels = np.asarray(picture, dtype=np.float32)  # (h, w, 3)
    grey = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (h, w) luma
    dimmed = (SPOTLIGHT_DIM * grey)[..., None]
    out = pixels * w[..., None] + dimmed * (1.0 - w[..., None])
    inside = w >= SPOTLIGHT_LINE
    if inside.any() and not inside.all():
        width = line_width(picture.size)
        edge = inside & ~_eroded(inside, width)  # the line, inside the region
        halo = ~inside & ~_eroded(~inside, max(1, width // 2))  # a dark edge just outside it
        out[halo] = out[halo] * 0.35
        out[edge] = 255.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` eroded ``steps`` times by the 4-neighbourhood; beyond the picture's edge the
    mask continues as it is at the edge (no line is drawn along the picture's border)."""
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        out = inner
    return out


def _bar_colours(cmap: str, ramp: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (..., 3) of a bar's values: a matplotlib colour map, or :data:`SPOTLIGHT`
    (dimmed mid-grey to white, as :func:`spotlight` renders a grey surface)."""
    if cmap == SPOTLIGHT:
        level = SPOTLIGHT_DIM + (1.0 - SPOTLIGHT_DIM) * ramp
        return np.repeat(level[..., None], 3, axis=-1)
    from matplotlib import colormaps

    return np.asarray(colormaps[cmap](ramp)[..., :3])


def colour_bar(
    cmap: str, width: int, title: str = "", font_size: int = MIN_FONT_SIZE
) -> Image.Image:
    """A horizontal colour bar of ``cmap`` (a matplotlib colour map, or :data:`SPOTLIGHT`) from
    0 (left) to 1 (right), ``width`` pixels wide, with its title above and ticks 0, 0.5, 1 under
    it.

    Example:
        >>> colour_bar("viridis", 300, "box-coordinate weight").width
        300
    """
    face = font(font_size)
    ascent, descent = face.getmetrics()
    text_h = ascent + descent
    gap = max(2, font_size // 4)
    bar_h = max(8, round(font_size * 0.9))
    margin = max(1, round(face.getlength("0.5") / 2))  # ticks centred on the ends stay inside
    inner = max(2, width - 2 * margin)
    lines = wrap_text(title, face, width)  # a long title wraps, never cut mid-sentence
    height = (len(lines) * text_h + gap if lines else 0) + bar_h + gap + text_h
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = 0
    if lines:
        for i, line in enumerate(lines):
            draw.text(((width - face.getlength(line)) / 2, i * text_h), line, fill=INK, font=face)
        y = len(lines) * text_h + gap
    ramp = np.linspace(0.0, 1.0, inner)[None, :].repeat(bar_h, axis=0)  # (bar_h, inner)
    strip = Image.fromarray((_bar_colours(cmap, ramp) * 255).astype(np.uint8), "RGB")
    out.paste(strip, (margin, y))
    draw.rectangle((margin, y, margin + inner - 1, y + bar_h - 1), outline=(90, 90, 90), width=1)
    for value, text in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        x = margin + value * (inner - 1)
        draw.line((x, y + bar_h, x, y + bar_h + gap - 1), fill=INK, width=1)
        left = min(max(0.0, x - face.getlength(text) / 2), width - face.getlength(text))
        draw.text((left, y + bar_h + gap), text, fill=INK, font=face)
    return out


def figure(
    picture: Image.Image,
    title: str = "",
    bar: tuple[str, str] | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """``picture`` with an optional title above it and an optional colour bar
    (``(cmap, bar title)``) under it, on white; the picture keeps its pixels at the top left
    of its own area (``(0, title height)``).

    Example:
        >>> figure(Image.new("RGB", (512, 384)), "cat", ("jet", "GA class weight")).width
        512
    """
    size = font_size or label_font_size(picture.size)
    face = font(size)
    ascent, descent = face.getmetrics()
    title = fit_text(" ".join(title.split()), face, picture.width)
    top = ascent + descent + max(2, size // 3) if title else 0
    strip = colour_bar(bar[0], picture.width, bar[1], size) if bar else None
    gap = max(4, size // 2) if strip is not None else 0
    height = top + picture.height + gap + (strip.height if strip is not None else 0)
    out = Image.new("RGB", (picture.width, height), BACKGROUND)
    if title:
        ImageDraw.Draw(out).text(
            ((picture.width - face.getlength(title)) / 2, 0), title, fill=INK, font=face
        )
    out.paste(picture.convert("RGB"), (0, top))
    if strip is not None:
        out.paste(strip, (0, top + picture.height + gap))
    return out


__all__ = [
    "MIN_SIDE",
    "OVERLAY_ALPHA",
    "PALETTE",
    "SPOTLIGHT",
    "LabelLayout",
    "LabelledBox",
    "blend_map",
    "colour_bar",
    "contrast_ratio",
    "draw_labelled_boxes",
    "figure",
    "fit_picture",
    "fit_text",
    "font",
    "hex_colour",
    "label_font_size",
    "line_width",
    "picture_size",
    "place_label",
    "query_colour",
    "relative_luminance",
    "spotlight",
    "text_colour",
    "wrap_text",
]
