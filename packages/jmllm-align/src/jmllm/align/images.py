"""The one image-decoding policy of every jmllm package (docs/conventions.md).

Every path that opens a user's image (training, evaluation, J's ``embed``, detection, GA,
the hallucination view, WSOL, bias portraits) goes through :func:`open_image`:

1. **Pixel limit from the header.** The file's header is read (``Image.open`` decodes nothing)
   and an image of more than :data:`MAX_IMAGE_PIXELS` (20 000 × 20 000) pixels is refused with
   one line naming the file, before a byte of pixel data is decoded: a 3 MB PNG that claims
   28 000 × 28 000 pixels costs nothing.
2. **Large JPEGs are decoded reduced.** ``Image.draft`` asks libjpeg for a 1/2, 1/4 or 1/8
   scale that is still at least the working size, so a 100-megapixel photo never exists in
   memory at full size.
3. **One downscale to the working size.** The decoded image is converted to 8-bit RGB (EXIF
   orientation applied unless ``exif_orientation=False``, the authors' ``authors`` preprocessing
   of :mod:`jmllm.align.preprocessing`; alpha on white, 16-bit scaled) and shrunk once, aspect
   kept, to at most
   :data:`WORKING_SIDE` (4096) pixels on its longest side. Models see at most 768 px, so nothing
   they could use is lost.
4. **Memory bounded by the output, not the file.** An image larger than the working size is
   reduced *before* any full-resolution conversion: a non-interlaced PNG is decoded strip by
   strip (:func:`png_strips`), each strip converted to RGB and box-reduced by an integer factor
   into a canvas of at most twice the working size, then shrunk once (bicubic); a JPEG is
   decoded reduced, then converted strip by strip. Formats that can only be decoded whole
   (WebP, TIFF, GIF, BMP, progressive JPEG, interlaced PNG, …) are accepted up to
   :data:`WHOLE_DECODE_PIXELS` (48 megapixels, e.g. 8000 × 6000) when they must be shrunk, and
   refused above it from the header. Peak memory stays under 1.5 GB for any accepted image
   (``benchmarks`` and ``tests/test_image_memory.py`` measure it).
5. **The original size travels with it.** :class:`LoadedImage` carries the full-resolution
   (oriented, when the orientation is applied) size; boxes are computed in, or mapped back to, the original pixels
   (:meth:`LoadedImage.to_original`, :func:`box_scale`), whatever size was decoded.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "WHOLE_DECODE_PIXELS",
    "WORKING_SIDE",
    "ImageLoadError",
    "LoadedImage",
    "box_scale",
    "check_pixels",
    "load_image",
    "open_image",
    "png_strips",
    "working_size",
]

MAX_IMAGE_PIXELS = 20_000 * 20_000  # larger images are refused from their header
WORKING_SIDE = 4096  # longest side of the decoded working copy (models see at most 768 px)
# Formats without a reduced or strip-wise decoder are decoded whole; when such an image must be
# shrunk, it may have at most this many pixels (e.g. 8000 x 6000): Pillow's WebP decoder, the
# hungriest, peaks at ~16 bytes per pixel, 0.8 GB here
WHOLE_DECODE_PIXELS = 48_000_000
STRIP_BYTES = 4 * 2**20  # decoded bytes per strip of a large image

# PIL's own guard (a warning above the limit, an error above twice it) must not refuse images
# our limit accepts; ours is checked explicitly, before decoding, in open_image.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


class ImageLoadError(ValueError):
    """An image could not be read, or is refused; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image under the policy: the RGB working copy and the original's size.

    Attributes:
        image: 8-bit RGB, longest side at most the working side.
        original_size: (width, height) of the full-resolution image, EXIF orientation applied.
        name: the file name (or a label) used in messages.
    """

    image: Image.Image
    original_size: tuple[int, int]
    name: str = "image"

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) original pixels per working pixel (1.0 when nothing was shrunk)."""
        return (
            self.original_size[0] / self.image.width,
            self.original_size[1] / self.image.height,
        )

    def to_original(self, boxes: Any) -> np.ndarray:
        """Boxes ``x0, y0, x1, y1`` in working pixels (K, 4) mapped to original pixels.

        Example:
            >>> im = LoadedImage(Image.new("RGB", (100, 50)), (400, 200))
            >>> im.to_original([[10, 10, 20, 20]]).tolist()
            [[40.0, 40.0, 80.0, 80.0]]
        """
        sx, sy = self.scale
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return b * np.array([sx, sy, sx, sy])


def check_pixels(size: Sequence[int], name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (or of none), naming it.

    Example:
        >>> check_pixels((28_000, 28_000), "bomb.png")
        Traceback (most recent call last):
        ...
        jmllm.align.images.ImageLoadError: bomb.png: image too large: 28000x28000 pixels \
(784.0 megapixels); the limit is 400.0 megapixels (20000x20000)
    """
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        side = math.isqrt(max_pixels)
        raise ImageLoadError(
            f"{name}: image too large: {width}x{height} pixels ({width * height / 1e6:.1f} "
            f"megapixels); the limit is {max_pixels / 1e6:.1f} megapixels ({side}x{side})"
        )


def working_size(size: Sequence[int], max_side: int | None = WORKING_SIDE) -> tuple[int, int]:
    """The (width, height) an image of ``size`` is shrunk to (aspect kept, at least 1 px).

    Example:
        >>> working_size((6000, 4000))
        (4096, 2731)
    """
    width, height = int(size[0]), int(size[1])
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def box_scale(original_size: Sequence[int], shown_size: Sequence[int]) -> tuple[float, float]:
    """(x, y) factors taking original pixels to pixels of a uniformly scaled copy of the image.

    Raises:
        ValueError: the copy's aspect differs by more than rounding (a different image).

    Example:
        >>> box_scale((6000, 4000), (4096, 2731))
        (0.6826666666666666, 0.68275)
    """
    ow, oh = (int(v) for v in original_size)
    sw, sh = (int(v) for v in shown_size)
    if ow < 1 or oh < 1 or sw < 1 or sh < 1:
        raise ValueError(f"image sizes must be positive, got {ow}x{oh} and {sw}x{sh}")
    sx, sy = sw / ow, sh / oh
    # a uniform shrink rounds each side to whole pixels: allow one pixel on either side
    if abs(oh * sx - sh) > 1.0 + 1e-9 and abs(ow * sy - sw) > 1.0 + 1e-9:
        raise ValueError(
            f"image is {sw}x{sh} but the boxes are for a {ow}x{oh} image (not a scaled copy)"
        )
    return sx, sy


def _orientation(image: Image.Image) -> int:
    try:
        if image.format == "PNG" and getattr(image, "tile", None):
            # Pillow's PngImageFile.getexif decodes the whole image to look for an eXIf chunk
            # after the pixels; the one before them (where the PNG spec puts it) is in info
            exif = Image.Exif()
            if image.info.get("exif"):
                exif.load(image.info["exif"])
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is no orientation
        return 1


def _to_rgb(image: Image.Image, exif_orientation: bool = True) -> Image.Image:
    """EXIF orientation applied (when asked); alpha on white; 16/32-bit grey scaled to 8 bits;
    RGB."""
    if exif_orientation:
        try:
            image = ImageOps.exif_transpose(image) or image
        except Exception:  # a broken EXIF block should not make the pixels unusable
            pass
    return _rgb_pixels(image)


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # scaled by their maximum
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _rgb_pixels(image: Image.Image) -> Image.Image:
    """The pixel conversion of :func:`_to_rgb`, pixel by pixel except the 16/32-bit scale."""
    if image.mode in _WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        scaled = (array / peak * 255.0).round().clip(0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _shrink(image: Image.Image, max_side: int | None) -> Image.Image:
    size = working_size(image.size, max_side)
    if size == image.size:
        return image
    # reducing_gap: a cheap integer reduce first, then bicubic over the last factor of 2
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


# -- decoding bounded by the output size ---------------------------------------------------------

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel
_LANE_MODES = {1: "L", 2: "I;16", 3: "RGB", 4: "RGBA"}  # Pillow modes that keep 1-4 bytes exactly


def _reduce_factor(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """Integer box-reduction factors that leave at most twice the target (at least the target):
    the canvas of a reduced decode is never larger than (2 × working side)²."""
    return (
        max(1, math.ceil(size[0] / target[0] / 2)),
        max(1, math.ceil(size[1] / target[1] / 2)),
    )


def _png_header(handle: IO[bytes]) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) of a PNG, from its IHDR chunk."""
    handle.seek(0)
    head = handle.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file with a header")
    width, height, bits, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return width, height, bits, colour, interlace


def _png_data(handle: IO[bytes]) -> Iterator[bytes]:
    """The concatenated IDAT payload of a PNG, in pieces (other chunks skipped)."""
    handle.seek(8)
    while True:
        head = handle.read(8)
        if len(head) < 8:
            raise EOFError("image file is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return
        if kind != b"IDAT":
            handle.seek(length + 4, os.SEEK_CUR)
            continue
        left = length
        while left:
            piece = handle.read(min(left, 1 << 16))
            if not piece:
                raise EOFError("image file is truncated")
            left -= len(piece)
            yield piece
        handle.read(4)  # CRC


def _unfilter(rows: np.ndarray, previous: np.ndarray, bpp: int) -> np.ndarray:
    """PNG rows (n, 1 + R) with their filter bytes → the unfiltered (n, R), by Pillow's own PNG
    decoder: the row above the strip goes first, unfiltered (filter 0). Pixels of more than 4
    bytes are split into independent lanes of 3 or 4 bytes (every filter works byte-wise on
    the byte ``bpp`` before), each a pixel of a Pillow mode that keeps its bytes exactly."""
    n, width_bytes = rows.shape[0], rows.shape[1] - 1
    lane = bpp if bpp <= 4 else bpp // 2
    out = np.empty((n, width_bytes), np.uint8)
    pixels = width_bytes // bpp
    for j in range(bpp // lane):
        if lane == bpp:
            body, above = rows, previous
        else:  # (n, pixels, bpp) → this lane's bytes of every pixel
            part = rows[:, 1:].reshape(n, pixels, bpp)[:, :, j * lane : (j + 1) * lane]
            body = np.concatenate([rows[:, :1], part.reshape(n, pixels * lane)], axis=1)
            above = previous.reshape(pixels, bpp)[:, j * lane : (j + 1) * lane].reshape(-1)
        stream = zlib.compress(b"\x00" + above.tobytes() + body.tobytes(), 0)  # stored: a copy
        mode = _LANE_MODES[lane]
        decoded = Image.frombytes(mode, ((body.shape[1] - 1) // lane, n + 1), stream, "zip", mode)
        raw = np.frombuffer(decoded.tobytes("raw", mode), np.uint8).reshape(n + 1, -1)[1:]
        if lane == bpp:
            out[:] = raw
        else:
            out.reshape(n, pixels, bpp)[:, :, j * lane : (j + 1) * lane] = raw.reshape(
                n, pixels, lane
            )
    return out


def png_strips(handle: IO[bytes], image: Image.Image, rows: int) -> Iterator[Image.Image]:
    """The pixels of a non-interlaced PNG as strips of ``rows`` rows (the last may be shorter),
    each a Pillow image in the mode Pillow gives the whole file: a 400-megapixel PNG is never
    in memory whole.

    The zlib stream is inflated piece by piece (at most one strip ahead), and every strip is
    unfiltered by Pillow's own PNG decoder (:func:`_unfilter`), so the pixels are exactly those
    of ``Image.open(...).load()``.

    Args:
        handle: the open file (seekable).
        image: ``Image.open(handle)`` (its header: mode, size, palette, transparency).
        rows: rows per strip.

    Raises:
        ValueError: interlaced, truncated or corrupt data.

    Example:
        >>> buffer = io.BytesIO(); Image.new("RGB", (5, 7), "red").save(buffer, format="PNG")
        >>> [s.size for s in png_strips(buffer, Image.open(buffer), 3)]
        [(5, 3), (5, 3), (5, 1)]
    """
    width, height, bits, colour, interlace = _png_header(handle)
    if interlace:
        raise ValueError("an interlaced PNG cannot be decoded strip by strip")
    tiles = getattr(image, "tile", None)  # an ImageFile's decoding plan
    if (width, height) != image.size or colour not in _PNG_CHANNELS or not tiles:
        raise ValueError("a PNG header that Pillow reads otherwise")
    rawmode = tiles[0].args
    rawmode = rawmode if isinstance(rawmode, str) else rawmode[0]
    row_bytes = (width * _PNG_CHANNELS[colour] * bits + 7) // 8
    bpp = max(1, _PNG_CHANNELS[colour] * bits // 8)
    palette = image.palette
    inflate = zlib.decompressobj()
    pieces = _png_data(handle)
    pending = bytearray()
    previous = np.zeros(row_bytes, np.uint8)
    for y in range(0, height, rows):
        n = min(rows, height - y)
        need = n * (row_bytes + 1)
        while len(pending) < need:  # never inflate more than this strip (a zlib bomb stays small)
            if inflate.unconsumed_tail:
                pending += inflate.decompress(inflate.unconsumed_tail, need - len(pending))
                continue
            piece = next(pieces, None)
            if piece is None:
                raise EOFError("image file is truncated")
            pending += inflate.decompress(piece, need - len(pending))
        strip = np.frombuffer(bytes(pending[:need]), np.uint8).reshape(n, row_bytes + 1)
        del pending[:need]
        if int(strip[:, 0].max()) > 4:
            raise ValueError("broken PNG data (unknown filter type)")
        pixels = _unfilter(strip, previous, bpp)
        previous = pixels[-1].copy()
        part = Image.frombytes(image.mode, (width, n), pixels.tobytes(), "raw", rawmode)
        if palette is not None and image.mode == "P":
            part.putpalette(palette.palette, palette.rawmode or "RGB")
        if "transparency" in image.info:
            part.info["transparency"] = image.info["transparency"]
        yield part


def _crops(image: Image.Image, rows: int) -> Iterator[Image.Image]:
    """A decoded image as strips of ``rows`` rows (copies: each conversion stays small)."""
    for y in range(0, image.height, rows):
        yield image.crop((0, y, image.width, min(image.height, y + rows)))


def _strip_rows(size: Sequence[int], factor: int, bytes_per_pixel: int = 4) -> int:
    rows = STRIP_BYTES // max(1, size[0] * bytes_per_pixel)
    return max(factor, rows // factor * factor)  # whole reduction blocks per strip


def _reduced_rgb(
    strips: Iterable[Image.Image],
    size: tuple[int, int],
    factor: tuple[int, int],
    orientation: int,
    target: tuple[int, int],
) -> Image.Image:
    """Strips (heights multiples of ``factor[1]``) converted to RGB one by one and box-reduced
    by ``factor`` into one canvas, then oriented and shrunk once to ``target`` (bicubic).

    The same pixels as converting the whole image, reducing it by ``factor`` and resizing the
    rest (the box reduction is a mean over aligned blocks, so strip by strip is exact), except
    for 16/32-bit images: their strips are reduced in float and scaled by the maximum of the
    full-resolution image at the end (within 2 grey levels of scaling first).
    """
    width, height = size
    fx, fy = factor
    canvas: Image.Image | None = None
    peak = 0.0
    y = 0
    for strip in strips:
        if strip.mode in _WIDE_MODES:
            values = np.asarray(strip, dtype=np.float32)
            if values.size:
                peak = max(peak, float(values.max()))
            part = Image.fromarray(values, "F")
        else:
            part = _rgb_pixels(strip)
        if factor != (1, 1):
            part = part.reduce((fx, fy))
        if canvas is None:
            canvas = Image.new(part.mode, (math.ceil(width / fx), math.ceil(height / fy)))
        canvas.paste(part, (0, y // fy))
        y += strip.height
    if canvas is None or y != height:
        raise ValueError(f"image data ends after {y} of {height} rows")
    if canvas.mode == "F":
        grey = np.array(canvas, dtype=np.float32)  # one copy, scaled in place
        grey *= 255.0 / peak if peak > 0 else 1.0
        np.clip(np.rint(grey, out=grey), 0, 255, out=grey)
        canvas = Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    box = (0.0, 0.0, width / fx, height / fy)  # the reduced canvas covers the whole image
    if orientation in _TRANSPOSE:
        canvas = canvas.transpose(_TRANSPOSE[orientation])
        if orientation in _ROTATED_ORIENTATIONS:
            box = (0.0, 0.0, box[3], box[2])
    if canvas.size == target and factor == (1, 1):
        return canvas
    return canvas.resize(target, Image.Resampling.BICUBIC, box=box)


def _whole_decode_refused(image: Image.Image, name: str) -> ImageLoadError:
    width, height = image.size
    what = image.format or "this format"
    if image.format == "PNG":
        what = "an interlaced or animated PNG"
    elif image.format in ("JPEG", "MPO"):
        what = "a progressive JPEG"
    return ImageLoadError(
        f"{name}: image too large to decode here: {width}x{height} pixels "
        f"({width * height / 1e6:.1f} megapixels) in {what}, which can only be decoded whole; "
        f"the limit for such images is {WHOLE_DECODE_PIXELS / 1e6:.1f} megapixels "
        "(e.g. 8000x6000); save it as a (non-interlaced) PNG or a baseline JPEG"
    )


def _streamable_png(image: Image.Image) -> bool:
    tiles = getattr(image, "tile", None) or []  # an ImageFile's decoding plan
    return (
        image.format == "PNG"
        and not image.info.get("interlace")
        and not getattr(image, "is_animated", False)
        and len(tiles) == 1
        and tiles[0].codec_name == "zip"
        and tuple(tiles[0].extents) == (0, 0, *image.size)
    )


def _reason(exc: BaseException) -> str:
    """Why a file could not be decoded, in words: never PIL's repr of the file handle (which
    names where the file was read from, e.g. a server's upload folder)."""
    if isinstance(exc, UnidentifiedImageError):
        return "unknown or unsupported image format"
    text = re.sub(r"<_io\.\w+ name=[^>]*>", "the file", str(exc))
    return " ".join(text.split()) or type(exc).__name__


def _decode(
    handle: IO[bytes], name: str, max_side: int | None, max_pixels: int, exif_orientation: bool
) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)  # reads the header only
        check_pixels(image.size, name, max_pixels)
        header_size = image.size
        orientation = _orientation(image) if exif_orientation else 1
        width, height = header_size
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        shrink = bool(max_side) and max(header_size) > (max_side or 0)
        if shrink and _streamable_png(image):
            target = working_size(header_size, max_side)
            factor = _reduce_factor(header_size, target)
            rows = _strip_rows(header_size, factor[1], bytes_per_pixel=8)
            strips = png_strips(handle, image, rows)
            rgb = _reduced_rgb(
                strips, header_size, factor, orientation, _oriented(target, orientation)
            )
            return LoadedImage(rgb, (width, height), name)
        jpeg = image.format in ("JPEG", "MPO")
        progressive = jpeg and bool(image.info.get("progressive") or image.info.get("progression"))
        if shrink and (not jpeg or progressive) and width * height > WHOLE_DECODE_PIXELS:
            raise _whole_decode_refused(image, name)
        if shrink and jpeg:
            target = working_size(header_size, max_side)
            image.draft("RGB", target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, >= target
        image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({_reason(exc)})") from None
    try:
        if shrink:
            rgb = _reduce_decoded(image, orientation, max_side)
        else:
            rgb = _shrink(_to_rgb(image, exif_orientation), max_side)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({_reason(exc)})") from None
    return LoadedImage(rgb, (width, height), name)


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _ROTATED_ORIENTATIONS else size


def _reduce_decoded(image: Image.Image, orientation: int, max_side: int | None) -> Image.Image:
    """A decoded image (a JPEG decoded reduced, or any image decoded whole) shrunk to the working
    size through strips, so no full-resolution converted copy ever exists."""
    target = working_size(image.size, max_side)
    factor = _reduce_factor(image.size, target)
    rows = _strip_rows(image.size, factor[1])
    return _reduced_rgb(
        _crops(image, rows), image.size, factor, orientation, _oriented(target, orientation)
    )


def open_image(
    source: str | os.PathLike[str] | Image.Image | bytes,
    *,
    max_side: int | None = WORKING_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    name: str | None = None,
    exif_orientation: bool = True,
) -> LoadedImage:
    """Decode an image under the policy (module docstring): header check, reduced JPEG decoding,
    8-bit RGB working copy of at most ``max_side`` px, original size kept.

    Conversions: EXIF orientation applied (unless ``exif_orientation`` is False: the pixels as
    stored, as the authors' ``Image.open(path).convert("RGB")`` left them); alpha (RGBA, LA, P
    with transparency) composited on
    white; 16- and 32-bit greyscale (``I;16``, ``I``, ``F``) scaled by their maximum to 0–255;
    CMYK, YCbCr, palette and greyscale converted to RGB by PIL.

    Args:
        source: a file path, encoded bytes, or a PIL image (checked against the limit too).
        max_side: longest side of the working copy; None keeps the decoded size.
        max_pixels: the pixel limit (default 20 000 × 20 000).
        name: the label used in messages (default: the path, or ``<bytes>``).
        exif_orientation: turn the image by its EXIF orientation tag (the ``exif``
            preprocessing); False keeps the stored pixels (``authors``, see
            :mod:`jmllm.align.preprocessing`).

    Returns:
        :class:`LoadedImage`.

    Raises:
        ImageLoadError: missing, truncated, corrupt, non-image, empty or too large (one line
            naming the file).

    Example:
        >>> loaded = open_image(Image.new("RGB", (6000, 4000)))
        >>> loaded.image.size, loaded.original_size
        ((4096, 2731), (6000, 4000))
    """
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", None) or "image"
        check_pixels(source.size, label, max_pixels)
        try:
            source.load()
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageLoadError(f"{label}: not a readable image ({exc})") from None
        width, height = source.size
        orientation = _orientation(source) if exif_orientation else 1
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        if max_side and max(source.size) > max_side:
            return LoadedImage(
                _reduce_decoded(source, orientation, max_side), (width, height), label
            )
        rgb = _shrink(_to_rgb(source, exif_orientation), max_side)
        return LoadedImage(rgb, (width, height), label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(
            io.BytesIO(bytes(source)), name or "<bytes>", max_side, max_pixels, exif_orientation
        )
    path = Path(source)
    label = name or str(path)
    if path.is_dir():
        raise ImageLoadError(f"{label}: is a folder, not an image file")
    if not path.is_file():
        raise ImageLoadError(f"{label}: no such image file")
    try:
        # Our own handle, closed on every path: a truncated file's handle must not live on in
        # the traceback of the error (a skip log keeps those).
        with path.open("rb") as handle:
            return _decode(handle, label, max_side, max_pixels, exif_orientation)
    except PermissionError as exc:
        raise ImageLoadError(f"{label}: cannot be read ({exc.strerror or exc})") from None


def load_image(
    source: str | os.PathLike[str] | Image.Image | bytes,
    *,
    max_side: int | None = WORKING_SIDE,
    exif_orientation: bool = True,
) -> Image.Image:
    """The RGB working copy of an image under the policy (:func:`open_image`'s ``.image``;
    ``exif_orientation`` as there).

    Raises:
        ImageLoadError: missing, truncated, corrupt, non-image, empty or too large.

    Example:
        >>> load_image(Image.new("LA", (4, 4))).mode
        'RGB'
    """
    return open_image(source, max_side=max_side, exif_orientation=exif_orientation).image
