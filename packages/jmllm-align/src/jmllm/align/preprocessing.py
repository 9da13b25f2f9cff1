"""The named image preprocessings: how a decoded image becomes each model's square input.

Two steps differ between the paper authors' scripts and what a photo user expects, so both are
chosen together, by name:

``authors``
    What the authors' scripts did (``Image.open(path).convert("RGB")``, then the Hugging Face
    image processors): the EXIF orientation tag is **ignored** (pixels as stored), and each
    model's square input is made with **PIL's bicubic resize** of the 8-bit image, then scaled by
    the processor's factor (1/255, in float64, cast to float32) and normalised in float32 — the
    processors' own arithmetic, so the pixel values equal ``OwlViTImageProcessor`` /
    ``CLIPImageProcessor`` (PIL backend, ``do_center_crop=False``) bit for bit. The default of
    the paper-reproduction paths.
``exif``
    What a photo user expects: the EXIF orientation is **applied** (a phone photo stands the
    right way up), and the resize is torch's antialiased bicubic, batched (about 4x faster than
    PIL on CPU, and on the GPU when the pixels are there). The default of interactive use.

The two resizes differ by a grey level or two on a small share of the pixels; the orientations
differ by a rotation or a mirror for an image whose EXIF orientation tag is not 1
(``docs/fidelity.md`` gives the measured differences).

Both run after the one image policy of :mod:`jmllm.align.images` (pixel limit, reduced JPEG
decoding and one shrink to at most 4096 px), so an image of more than 4096 px on its longest
side is resized from that working copy under either name: ``authors`` equals the processors
bit for bit for images up to 4096 px (every COCO, CUB and Open Images photo).

Example:
    >>> get_preprocessing("authors").exif_orientation
    False
    >>> get_preprocessing("exif").resize
    'torch'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "INTERACTIVE_PREPROCESSING",
    "PAPER_PREPROCESSING",
    "PREPROCESSINGS",
    "Preprocessing",
    "get_preprocessing",
]


@dataclass(frozen=True)
class Preprocessing:
    """One named preprocessing.

    Attributes:
        name: ``"authors"`` or ``"exif"``.
        exif_orientation: whether the image is turned by its EXIF orientation tag.
        resize: ``"pil"`` (PIL bicubic + the processors' float arithmetic) or ``"torch"``
            (torch's antialiased bicubic).
    """

    name: str
    exif_orientation: bool
    resize: str


PREPROCESSINGS: dict[str, Preprocessing] = {
    "authors": Preprocessing("authors", exif_orientation=False, resize="pil"),
    "exif": Preprocessing("exif", exif_orientation=True, resize="torch"),
}
# judge captions, bias, WSOL, user-study maps, the hallucination audit, W's paper preset
PAPER_PREPROCESSING = "authors"
# chat, describe, detect, explain, hallucinations, the demo, the explorer app
INTERACTIVE_PREPROCESSING = "exif"


def get_preprocessing(preprocessing: str | Preprocessing) -> Preprocessing:
    """The :class:`Preprocessing` named ``preprocessing`` (or ``preprocessing`` itself).

    Raises:
        ValueError: an unknown name; the message lists the known ones.

    Example:
        >>> get_preprocessing("exif").name
        'exif'
        >>> get_preprocessing("raw")
        Traceback (most recent call last):
        ...
        ValueError: preprocessing: unknown preprocessing 'raw' (known: authors, exif)
    """
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if isinstance(preprocessing, str) and preprocessing in PREPROCESSINGS:
        return PREPROCESSINGS[preprocessing]
    known = ", ".join(sorted(PREPROCESSINGS))
    raise ValueError(f"preprocessing: unknown preprocessing {preprocessing!r} (known: {known})")
