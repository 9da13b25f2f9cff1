"""A contact sheet per cohort: every portrait as a thumbnail with its image id under it, one
labelled block per group, in the scalable font of every jmllm picture
(:func:`jmllm.joint.render.drawing.font`)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from jmllm.align.images import load_image
from jmllm.joint.render.drawing import INK, fit_text, font

from .files import atomic_write_bytes

__all__ = ["write_contact_sheet"]


def write_contact_sheet(
    groups: Sequence[tuple[str, Sequence[str | os.PathLike[str]]]],
    out: str | os.PathLike[str],
    thumb: int = 128,
    columns: int = 10,
    title: str | None = None,
) -> Path:
    """Write a PNG grid of thumbnails with a label band above each group and each portrait's image
    id (its file name without the extension) under it.

    Portraits are scaled to fit the ``thumb`` square, small ones enlarged. An image that is
    missing or unreadable gets a grey tile marked "missing", so the sheet still shows where the
    hole is.

    Args:
        groups: ``(label, image paths)`` per group, in display order.
        out: PNG file to write (atomically).
        thumb: thumbnail side in pixels.
        columns: thumbnails per row.
        title: optional heading (e.g. the cohort name).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Example:
        >>> write_contact_sheet([("female", ["a.png"]), ("male", ["b.png"])], "sheet.png")  # doctest: +SKIP
    """
    if columns < 1 or thumb < 8:
        raise ValueError("columns must be >= 1 and thumb >= 8")
    id_font = font(max(11, min(15, thumb // 10)))
    label_font = font(max(13, min(18, thumb // 8)), bold=True)
    title_font = font(max(15, min(22, thumb // 6)), bold=True)
    pad = max(4, thumb // 24)
    id_h = _line_height(id_font) + pad  # the image id under each portrait
    band = _line_height(label_font) + 2 * pad  # a group's label
    title_h = _line_height(title_font) + 2 * pad if title else 0
    width_cols = min(columns, max((len(p) for _, p in groups), default=1)) or 1
    cell_h = thumb + id_h + pad
    width = pad + width_cols * (thumb + pad)
    height = title_h + pad
    for _, paths in groups:
        rows = max(1, math.ceil(len(paths) / width_cols))
        height += band + rows * cell_h
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    if title:
        draw.text((pad, y), fit_text(title, title_font, width - 2 * pad), fill=INK, font=title_font)
        y += title_h
    for label, paths in groups:
        heading = fit_text(f"{label} ({len(paths)})", label_font, width - 2 * pad)
        draw.text((pad, y + pad), heading, fill=INK, font=label_font)
        y += band
        for i, path in enumerate(paths):
            x = pad + (i % width_cols) * (thumb + pad)
            yy = y + (i // width_cols) * cell_h
            sheet.paste(_tile(path, thumb), (x, yy))
            image_id = fit_text(Path(path).stem, id_font, thumb)
            left = x + (thumb - id_font.getlength(image_id)) / 2
            draw.text((left, yy + thumb + pad // 2), image_id, fill=INK, font=id_font)
        y += max(1, math.ceil(len(paths) / width_cols)) * cell_h
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(out, buf.getvalue())


def _line_height(face: Any) -> int:
    ascent, descent = face.getmetrics()
    return int(ascent + descent)


def _tile(path: str | os.PathLike[str], thumb: int) -> Image.Image:
    """The portrait scaled to fit a ``thumb`` square (small ones enlarged), centred on white; a
    grey tile marked "missing" when it cannot be read."""
    tile = Image.new("RGB", (thumb, thumb), "white")
    try:
        # the shared image policy: pixel limit from the header, reduced JPEG decoding
        image = load_image(path, max_side=thumb)
    except (OSError, ValueError):
        tile.paste((200, 200, 200), (0, 0, thumb, thumb))
        face = font(max(11, thumb // 8), bold=True)
        text = "missing"
        ImageDraw.Draw(tile).text(
            ((thumb - face.getlength(text)) / 2, thumb // 2 - _line_height(face) // 2),
            text,
            fill=(160, 0, 0),
            font=face,
        )
        return tile
    scale = thumb / max(image.size)
    if scale > 1:  # a small portrait is enlarged to the tile, as every jmllm picture is
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    tile.paste(image, ((thumb - image.width) // 2, (thumb - image.height) // 2))
    return tile
