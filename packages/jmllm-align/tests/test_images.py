"""The one image-decoding policy (jmllm.align.images): pixel limit from the header, reduced JPEG
decoding, one shrink to the working size, original size kept for boxes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from jmllm.align.images import (
    MAX_IMAGE_PIXELS,
    WORKING_SIDE,
    ImageLoadError,
    box_scale,
    load_image,
    open_image,
)
from jmllm.align.testing import png_claiming


def test_header_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(28_000, 28_000))
    assert bomb.stat().st_size < 1000
    with pytest.raises(ImageLoadError) as info:
        open_image(bomb)
    message = str(info.value)
    assert message.startswith(f"{bomb}: image too large: 28000x28000 pixels")
    assert "20000x20000" in message and "\n" not in message
    # exactly at the limit is allowed by the header check (the file is then merely truncated)
    side = int(MAX_IMAGE_PIXELS**0.5)
    (tmp_path / "edge.png").write_bytes(png_claiming(side, side))
    with pytest.raises(ImageLoadError, match="not a readable image"):
        open_image(tmp_path / "edge.png")


def test_real_decompression_bomb_keeps_memory_small(tmp_path):
    """A genuine 28000 x 28000 PNG (784 megapixels of zeros in 3.4 MB): decoding it would
    need over 0.75 GB (2.3 GB as RGB). Measured in a child process."""
    bomb = tmp_path / "real-bomb.png"
    bomb.write_bytes(png_claiming(28_000, 28_000, rows=28_000))
    assert bomb.stat().st_size < 4_000_000
    script = textwrap.dedent(
        f"""
        import sys
        from jmllm.align.testing import peak_rss_mb
        from jmllm.align.images import ImageLoadError, open_image
        try:
            open_image({str(bomb)!r})
        except ImageLoadError as exc:
            print("REFUSED", exc)
        print("PEAK", peak_rss_mb())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert "REFUSED" in proc.stdout and "image too large" in proc.stdout, proc.stdout + proc.stderr
    peak_mb = float(proc.stdout.split("PEAK")[-1])
    assert peak_mb < 700, f"peak RSS {peak_mb:.0f} MB: the bomb was decoded"


def test_large_photo_is_shrunk_once_and_keeps_its_original_size(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).resize((6000, 4000))
    photo.save(tmp_path / "photo.jpg", quality=80)
    loaded = open_image(tmp_path / "photo.jpg")
    assert loaded.original_size == (6000, 4000)
    assert loaded.image.size == (WORKING_SIDE, 2731) and loaded.image.mode == "RGB"
    assert loaded.to_original([[0, 0, 4096, 2731]]).round().tolist() == [[0, 0, 6000, 4000]]
    small = open_image(Image.new("RGB", (640, 480)))
    assert small.image.size == small.original_size == (640, 480)


def test_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    Image.new("RGB", (10_000, 2_000), (200, 30, 30)).save(tmp_path / "pano.jpg", quality=70)
    decoded_sizes = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        decoded_sizes.append(self.size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    loaded = open_image(tmp_path / "pano.jpg")
    assert loaded.original_size == (10_000, 2_000) and loaded.image.size == (4096, 819)
    # libjpeg decoded at half scale (5000 x 1000), never the full 20 megapixels
    assert decoded_sizes == [(5000, 1000)]
    assert np.asarray(loaded.image)[400, 2000].tolist() == pytest.approx([200, 30, 30], abs=4)


def test_exif_rotation_swaps_the_original_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (6000, 4000)).save(tmp_path / "rot.jpg", exif=exif)
    loaded = open_image(tmp_path / "rot.jpg")
    assert loaded.original_size == (4000, 6000) and loaded.image.size == (2731, 4096)


def test_exif_orientation_can_be_ignored_as_the_authors_did(tmp_path):
    # a 3 x 2 image whose EXIF says "rotate 90° clockwise to display" (orientation 6)
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.png"
    Image.fromarray(pixels).save(path, exif=exif)
    turned = open_image(path)
    stored = open_image(path, exif_orientation=False)
    # the authors' Image.open(path).convert("RGB"): the pixels as stored, the stored size
    with Image.open(path) as im:
        authors = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(stored.image), authors)
    assert stored.original_size == (3, 2)
    assert turned.original_size == (2, 3)
    assert np.array_equal(np.asarray(turned.image), np.rot90(authors, k=-1))
    # the same rule for bytes, for PIL images and through load_image
    data = path.read_bytes()
    assert open_image(data, exif_orientation=False).original_size == (3, 2)
    with Image.open(path) as im:
        assert open_image(im, exif_orientation=False).original_size == (3, 2)
        assert open_image(im).original_size == (2, 3)
    assert load_image(path, exif_orientation=False).size == (3, 2)


def test_in_memory_images_and_bytes_follow_the_same_policy(tmp_path):
    with pytest.raises(ImageLoadError, match="huge: image too large"):
        open_image(Image.new("1", (20_001, 20_000)), name="huge")
    data = png_claiming(30_000, 30_000)
    with pytest.raises(ImageLoadError, match=r"<bytes>: image too large"):
        load_image(data)
    with pytest.raises(ImageLoadError, match="no such image file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="is a folder, not an image file"):
        load_image(tmp_path)  # a folder exists: "no such image file" would mislead


def test_box_scale_accepts_only_scaled_copies():
    assert box_scale((6000, 4000), (4096, 2731)) == pytest.approx((4096 / 6000, 2731 / 4000))
    assert box_scale((5000, 1), (4096, 1)) == pytest.approx((4096 / 5000, 1.0))
    with pytest.raises(ValueError, match="not a scaled copy"):
        box_scale((6000, 4000), (100, 100))
