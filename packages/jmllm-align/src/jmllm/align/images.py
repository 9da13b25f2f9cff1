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
   orientation applied, alpha on white, 16-bit scaled) and shrunk once, aspect kept, to at most
   :data:`WORKING_SIDE` (4096) pixels on its longest side. Models see at most 768 px, so nothing
   they could use is lost.
4. **The original size travels with it.** :class:`LoadedImage` carries the full-resolution
   (oriented) size; boxes are computed in, or mapped back to, the original pixels
   (:meth:`LoadedImage.to_original`, :func:`box_scale`), whatever size was decoded.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "WORKING_SIDE",
    "ImageLoadError",
    "LoadedImage",
    "box_scale",
    "check_pixels",
    "load_image",
    "open_image",
    "working_size",
]

MAX_IMAGE_PIXELS = 20_000 * 20_000  # larger images are refused from their header
WORKING_SIDE = 4096  # longest side of the decoded working copy (models see at most 768 px)

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
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is no orientation
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; alpha on white; 16/32-bit grey scaled to 8 bits; RGB."""
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block should not make the pixels unusable
        pass
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = Image.fromarray((array / peak * 255.0).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
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


def _reason(exc: BaseException) -> str:
    """Why a file could not be decoded, in words: never PIL's repr of the file handle (which
    names where the file was read from, e.g. a server's upload folder)."""
    if isinstance(exc, UnidentifiedImageError):
        return "unknown or unsupported image format"
    text = re.sub(r"<_io\.\w+ name=[^>]*>", "the file", str(exc))
    return " ".join(text.split()) or type(exc).__name__


def _decode(handle: IO[bytes], name: str, max_side: int | None, max_pixels: int) -> LoadedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)  # reads the header only
        check_pixels(image.size, name, max_pixels)
        header_size = image.size
        if max_side and image.format == "JPEG" and max(header_size) > max_side:
            target = working_size(header_size, max_side)
            image.draft("RGB", target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, >= target
        image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({_reason(exc)})") from None
    width, height = header_size
    if _orientation(image) in _ROTATED_ORIENTATIONS:
        width, height = height, width
    try:
        rgb = _shrink(_to_rgb(image), max_side)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(f"{name}: not a readable image ({_reason(exc)})") from None
    return LoadedImage(rgb, (width, height), name)


def open_image(
    source: str | os.PathLike[str] | Image.Image | bytes,
    *,
    max_side: int | None = WORKING_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    name: str | None = None,
) -> LoadedImage:
    """Decode an image under the policy (module docstring): header check, reduced JPEG decoding,
    8-bit RGB working copy of at most ``max_side`` px, original size kept.

    Conversions: EXIF orientation applied; alpha (RGBA, LA, P with transparency) composited on
    white; 16- and 32-bit greyscale (``I;16``, ``I``, ``F``) scaled by their maximum to 0–255;
    CMYK, YCbCr, palette and greyscale converted to RGB by PIL.

    Args:
        source: a file path, encoded bytes, or a PIL image (checked against the limit too).
        max_side: longest side of the working copy; None keeps the decoded size.
        max_pixels: the pixel limit (default 20 000 × 20 000).
        name: the label used in messages (default: the path, or ``<bytes>``).

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
        if _orientation(source) in _ROTATED_ORIENTATIONS:
            width, height = height, width
        return LoadedImage(_shrink(_to_rgb(source), max_side), (width, height), label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), name or "<bytes>", max_side, max_pixels)
    path = Path(source)
    label = name or str(path)
    if not path.is_file():
        raise ImageLoadError(f"{label}: no such image file")
    try:
        # Our own handle, closed on every path: a truncated file's handle must not live on in
        # the traceback of the error (a skip log keeps those).
        with path.open("rb") as handle:
            return _decode(handle, label, max_side, max_pixels)
    except PermissionError as exc:
        raise ImageLoadError(f"{label}: cannot be read ({exc.strerror or exc})") from None


def load_image(
    source: str | os.PathLike[str] | Image.Image | bytes, *, max_side: int | None = WORKING_SIDE
) -> Image.Image:
    """The RGB working copy of an image under the policy (:func:`open_image`'s ``.image``).

    Raises:
        ImageLoadError: missing, truncated, corrupt, non-image, empty or too large.

    Example:
        >>> load_image(Image.new("LA", (4, 4))).mode
        'RGB'
    """
    return open_image(source, max_side=max_side).image
