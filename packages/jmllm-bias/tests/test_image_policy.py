"""Portraits are opened under the shared image policy (jmllm.align.images): the contact sheet
never decodes an image whose header claims more than the pixel limit."""

from __future__ import annotations

import numpy as np
from PIL import Image

from jmllm.align.testing import png_claiming
from jmllm.bias.contact_sheet import write_contact_sheet


def test_contact_sheet_refuses_a_bomb_and_draws_the_rest(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.new("RGB", (300, 200), (250, 10, 10)).save(good)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(28_000, 28_000))
    loads = []
    original = Image.Image.load

    def spy(self):
        loads.append(self.size)
        return original(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    sheet = write_contact_sheet([("g", [good, bomb])], tmp_path / "sheet.png", thumb=64)
    assert (28_000, 28_000) not in loads  # refused from the header, never decoded
    monkeypatch.undo()
    with Image.open(sheet) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels == [250, 10, 10]).all(axis=-1).sum() > 64 * 40  # the good thumbnail
