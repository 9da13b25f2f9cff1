"""A contact sheet per cohort: every portrait as a thumbnail, one labelled block per group."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from jmllm.align.images import load_image

from .files import atomic_write_bytes

__all__ = ["write_contact_sheet"]


def write_contact_sheet(
    groups: Sequence[tuple[str, Sequence[str | os.PathLike[str]]]],
    out: str | os.PathLike[str],
    thumb: int = 128,
    columns: int = 10,
    title: str | None = None,
) -> Path:
    """Write a PNG grid of thumbnails with a label band above each group.

    An image that is missing or unreadable gets a grey tile marked "missing", so the sheet still
    shows where the hole is.

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
    font = ImageFont.load_default()
    band = 22  # label height in pixels
    pad = 4
    width_cols = min(columns, max((len(p) for _, p in groups), default=1)) or 1
    width = pad + width_cols * (thumb + pad)
    height = (band if title else 0) + pad
    for _, paths in groups:
        rows = max(1, math.ceil(len(paths) / width_cols))
        height += band + rows * (thumb + pad)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    if title:
        draw.text((pad, y), title, fill="black", font=font)
        y += band
    for label, paths in groups:
        draw.text((pad, y + 4), f"{label} ({len(paths)})", fill="black", font=font)
        y += band
        for i, path in enumerate(paths):
            x = pad + (i % width_cols) * (thumb + pad)
            yy = y + (i // width_cols) * (thumb + pad)
            try:
                # the shared image policy: pixel limit from the header, reduced JPEG decoding
                tile = load_image(path, max_side=thumb)
            except (OSError, ValueError):
                tile = Image.new("RGB", (thumb, thumb), (200, 200, 200))
                ImageDraw.Draw(tile).text((4, thumb // 2 - 6), "missing", fill="red", font=font)
            sheet.paste(tile, (x + (thumb - tile.width) // 2, yy + (thumb - tile.height) // 2))
        y += max(1, math.ceil(len(paths) / width_cols)) * (thumb + pad)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(out, buf.getvalue())
