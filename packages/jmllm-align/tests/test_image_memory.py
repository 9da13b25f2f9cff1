"""Decoding memory is bounded by the output size (jmllm.align.images): large PNGs are decoded
strip by strip, every large image is reduced before any full-resolution conversion, and formats
that can only be decoded whole are refused from the header above their limit.

The strip decoder is checked against Pillow's own whole-image decode on every PNG filter, bit
depth and colour type; the reduced pipeline against the straightforward one (convert the whole
image, box-reduce, resize); the peak memory on the three small files that used to take
gigabytes, each in a child process."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from jmllm.align import images
from jmllm.align.images import ImageLoadError, open_image, png_strips
from jmllm.align.testing import (
    png_claiming,
    png_with_filters,
    webp_lossless_constant,
    write_large_png,
)

RNG = np.random.default_rng(7)
H, W = 61, 83  # odd sizes: strips and reduction blocks never line up with the image


def _samples(shape: tuple[int, ...], top: int) -> np.ndarray:
    """Smooth gradients plus noise: every filter type has work to do."""
    ramp = np.add.outer(np.arange(shape[0]) * 13, np.arange(shape[1]) * 7)
    ramp = ramp.reshape(shape[:2] + (1,) * (len(shape) - 2))
    return (ramp + RNG.integers(0, max(2, top // 8), shape)) % top


PALETTE = bytes(RNG.integers(0, 256, 48, dtype=np.uint8))
CASES = {
    # name: (samples, bits, colour, extra chunks)
    "grey 1-bit": (_samples((H, W), 2), 1, 0, {}),
    "grey 2-bit": (_samples((H, W), 4), 2, 0, {}),
    "grey 4-bit": (_samples((H, W), 16), 4, 0, {}),
    "grey 8-bit": (_samples((H, W), 256), 8, 0, {}),
    "grey 16-bit": (_samples((H, W), 65536), 16, 0, {}),
    "RGB 8-bit": (_samples((H, W, 3), 256), 8, 2, {}),
    "RGB 16-bit": (_samples((H, W, 3), 65536), 16, 2, {}),
    "palette 4-bit": (_samples((H, W), 16), 4, 3, {"palette": PALETTE}),
    "palette + alpha": (
        _samples((H, W), 16),
        8,
        3,
        {"palette": PALETTE, "transparency": bytes(range(0, 256, 16))},
    ),
    "grey+alpha 8-bit": (_samples((H, W, 2), 256), 8, 4, {}),
    "grey+alpha 16-bit": (_samples((H, W, 2), 65536), 16, 4, {}),
    "RGBA 8-bit": (_samples((H, W, 4), 256), 8, 6, {}),
    "RGBA 16-bit": (_samples((H, W, 4), 65536), 16, 6, {}),
}


def _png(name: str) -> bytes:
    samples, bits, colour, extra = CASES[name]
    return png_with_filters(samples, bits, colour, **extra)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("rows", [1, 4, 7, H])
def test_strips_are_exactly_pillows_pixels(name: str, rows: int) -> None:
    """Every filter type crosses every strip boundary; 16-bit and 6/8-byte pixels go through
    the lane split; sub-byte rows, palettes and tRNS keep their meaning."""
    data = _png(name)
    whole = Image.open(io.BytesIO(data))
    whole.load()
    handle = io.BytesIO(data)
    strips = list(png_strips(handle, Image.open(handle), rows))
    assert [s.height for s in strips[:-1]] == [rows] * (len(strips) - 1)
    assert sum(s.height for s in strips) == H
    assert {s.mode for s in strips} == {whole.mode}
    joined = np.concatenate([np.asarray(s) for s in strips])
    assert np.array_equal(joined, np.asarray(whole)), name
    if whole.mode == "P":
        assert strips[0].getpalette() == whole.getpalette()
        assert strips[0].info.get("transparency") == whole.info.get("transparency")


def _reference(data: bytes, max_side: int) -> Image.Image:
    """The straightforward pipeline: the whole image (a JPEG at libjpeg's reduced scale)
    converted to RGB, box-reduced by the same integer factor, then resized (bicubic) over the
    same box."""
    whole = Image.open(io.BytesIO(data))
    if whole.format == "JPEG":  # decoded reduced by libjpeg first, as the policy does
        whole.draft("RGB", images.working_size(whole.size, max_side))
    whole.load()
    target = images.working_size(whole.size, max_side)
    factor = images._reduce_factor(whole.size, target)
    rgb = images._to_rgb(whole)
    if factor != (1, 1):
        rgb = rgb.reduce(factor)
    box = (0.0, 0.0, whole.width / factor[0], whole.height / factor[1])
    return rgb.resize(target, Image.Resampling.BICUBIC, box=box)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("max_side", [40, 19])
def test_reduced_decode_equals_converting_the_whole_image(monkeypatch, name, max_side) -> None:
    """Strip by strip (3 rows at a time here) gives the pixels of converting the whole image
    first: exactly, except 16-bit grey, scaled by its maximum after the reduction (± 2)."""
    monkeypatch.setattr(images, "STRIP_BYTES", 3 * W)
    data = _png(name)
    loaded = open_image(data, max_side=max_side)
    reference = _reference(data, max_side)
    assert loaded.original_size == (W, H)
    assert loaded.image.size == reference.size == images.working_size((W, H), max_side)
    diff = np.abs(np.asarray(loaded.image, int) - np.asarray(reference, int))
    assert diff.max() <= (2 if name == "grey 16-bit" else 0), (name, diff.max())


@pytest.mark.parametrize("kind", ["webp", "tiff", "jpeg", "image"])
def test_images_decoded_whole_are_converted_in_strips_too(monkeypatch, kind) -> None:
    """Formats without a strip decoder (and in-memory images) are converted strip by strip
    after the decode: the same pixels as converting the whole image."""
    monkeypatch.setattr(images, "STRIP_BYTES", 5 * W * 4)
    rgba = Image.fromarray(_samples((H, W, 4), 256).astype(np.uint8), "RGBA")
    buffer = io.BytesIO()
    if kind == "webp":
        rgba.save(buffer, format="WEBP", lossless=True)
    elif kind == "tiff":
        rgba.save(buffer, format="TIFF")
    elif kind == "jpeg":
        rgba.convert("RGB").save(buffer, format="JPEG", quality=95)
    source = rgba if kind == "image" else buffer.getvalue()
    loaded = open_image(source, max_side=30)
    expected = _reference(buffer.getvalue(), 30) if kind != "image" else None
    if expected is None:
        png = io.BytesIO()
        rgba.save(png, format="PNG")
        expected = _reference(png.getvalue(), 30)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(expected)), kind


def test_exif_orientation_is_kept_on_the_strip_path(monkeypatch) -> None:
    """An eXIf chunk before the pixels rotates the result; reading it decodes nothing."""
    monkeypatch.setattr(images, "STRIP_BYTES", 3 * W)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise
    ys, xs = np.mgrid[0:H, 0:W]
    smooth = np.stack([ys * 2 + xs, 200 - xs, ys * 3], axis=-1)  # (H, W, 3), no edges
    data = png_with_filters(smooth, 8, 2, exif=exif.tobytes())
    loaded = open_image(data, max_side=40)
    assert loaded.original_size == (H, W)  # width and height swapped
    assert loaded.image.size == images.working_size((H, W), 40)
    whole = Image.open(io.BytesIO(data))
    expected = images._shrink(images._to_rgb(whole), 40)  # rotated at full size, then shrunk
    assert np.abs(np.asarray(loaded.image, int) - np.asarray(expected, int)).mean() < 4


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_a_truncated_large_png_is_one_line(monkeypatch, cut) -> None:
    monkeypatch.setattr(images, "STRIP_BYTES", 3 * W)
    data = _png("RGBA 8-bit")
    with pytest.raises(ImageLoadError) as info:
        open_image(data[: int(len(data) * cut)], max_side=40, name="cut.png")
    assert str(info.value).startswith("cut.png: not a readable image")
    assert "\n" not in str(info.value)


def test_a_corrupt_filter_byte_is_one_line(monkeypatch) -> None:
    import zlib

    monkeypatch.setattr(images, "STRIP_BYTES", 3 * W)
    rows = np.zeros((H, W + 1), np.uint8)
    rows[5, 0] = 9  # no such filter
    data = png_claiming(W, H)  # an 8-bit grey header with no data
    idat = zlib.compress(rows.tobytes())
    head, _ = data.split(b"IDAT", 1)
    import struct

    crc = struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    data = head[:-4] + struct.pack(">I", len(idat)) + b"IDAT" + idat + crc
    data += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        open_image(data, max_side=40, name="bad.png")


def _claiming_interlaced(width: int, height: int) -> bytes:
    data = bytearray(png_claiming(width, height))
    data[28] = 1  # IHDR's interlace method: Adam7
    import struct
    import zlib

    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("kind", ["webp", "interlaced png", "progressive jpeg"])
def test_whole_decode_formats_over_their_limit_are_refused_from_the_header(
    monkeypatch, kind
) -> None:
    if kind == "webp":
        data = webp_lossless_constant(9000, 9000)
    elif kind == "interlaced png":
        data = _claiming_interlaced(9000, 9000)
    else:
        monkeypatch.setattr(images, "WHOLE_DECODE_PIXELS", 100)
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30)).save(buffer, format="JPEG", progressive=True)
        data = buffer.getvalue()
    with pytest.raises(ImageLoadError) as info:
        open_image(data, max_side=16, name="big")
    message = str(info.value)
    assert message.startswith("big: image too large to decode here")
    assert "megapixels" in message and "\n" not in message
    # at the working size or below nothing needs shrinking, and the image is decoded whole
    if kind == "progressive jpeg":
        assert open_image(data).image.size == (40, 30)


MEMORY_LIMIT_MB = 1536  # peak RSS, the interpreter, NumPy, Pillow and torch (jmllm.align) included


def _peak_in_child(path: str) -> tuple[str, float]:
    script = textwrap.dedent(
        f"""
        from jmllm.align.images import ImageLoadError, open_image
        from jmllm.align.testing import peak_rss_mb
        try:
            loaded = open_image({path!r})
            print("OK", loaded.image.size, loaded.original_size)
        except ImageLoadError as exc:
            print("REFUSED", exc)
        print("PEAK", peak_rss_mb())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "PEAK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout, float(proc.stdout.split("PEAK")[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "side"),
    [("I;16", 20_000), ("RGBA", 20_000), ("webp", 16_383), ("webp", 6_900)],
)
def test_small_files_decode_in_bounded_memory(tmp_path, kind, side) -> None:
    """The files that took 11, 8.5 and 5.9 GB: a 0.8 MB 16-bit grey PNG and a 1.6 MB RGBA PNG
    of 20000 x 20000 pixels decode to the working size under 1.5 GB; a 16383 x 16383 lossless
    WebP (a few dozen bytes), which only decodes whole, is refused from its header; a WebP just
    under that limit (47.6 megapixels) decodes under 1.5 GB."""
    if kind == "webp":
        path = tmp_path / "big.webp"
        path.write_bytes(webp_lossless_constant(side, side, (128, 10, 200, 30)))
    else:
        path = write_large_png(tmp_path / "big.png", side, side, kind)
        assert path.stat().st_size < 2_000_000
    out, peak_mb = _peak_in_child(str(path))
    assert peak_mb < MEMORY_LIMIT_MB, f"{kind} {side}: peak RSS {peak_mb:.0f} MB"
    if kind == "webp" and side > 8000:
        assert "REFUSED" in out and "image too large to decode here" in out, out
    else:
        assert f"OK (4096, 4096) ({side}, {side})" in out, out
