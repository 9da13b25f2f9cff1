"""Is an image a toy scene? The toy J's check on every image it embeds.

The toy world's models know coloured shapes on neutral backgrounds and nothing else; given a
photo they still answer, confidently and wrongly. So the toy J (:func:`jmllm.joint.toy.load_toy_joint`)
checks each image it embeds and logs a warning for one that is not like its scenes. The rule is
simple and documented (docs/toy.md):

- the image is not :data:`~jmllm.joint.toy.scenes.IMAGE_SIZE` × ``IMAGE_SIZE`` pixels (every toy
  scene is 128 × 128), or
- more than :data:`OFF_PALETTE_LIMIT` of its pixels are *off-palette*: coloured (largest minus
  smallest channel above :data:`CHROMA_MIN`) yet farther than :data:`PALETTE_DISTANCE` (RGB
  Euclidean) from all four object colours. Toy backgrounds are grey with a faint tint and
  objects are one of the four colours, so a scene has none; a photo has many.

Example:
    >>> from jmllm.joint.toy.scenes import make_scene
    >>> toy_image_problem(make_scene("heldout", 0).image) is None
    True
    >>> toy_image_problem(Image.new("RGB", (640, 480)))
    '640 × 480 pixels, not a 128 × 128 toy scene'
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from jmllm.joint.toy.scenes import COLOURS, IMAGE_SIZE

CHROMA_MIN = 40  # a pixel whose channels differ by more than this is coloured, not grey
PALETTE_DISTANCE = 60.0  # farther than this from every object colour: off-palette
OFF_PALETTE_LIMIT = 0.02  # share of off-palette pixels above which an image is not a scene
TOY_WARNING = (
    "the toy world's models know only coloured shapes (circle, square, triangle, cross in red, "
    "green, blue, yellow) on plain backgrounds; their answer, boxes and maps for this image "
    "mean nothing. Use real checkpoints (--owl/--mllm/--alignment) for photos."
)


def off_palette_share(pixels: np.ndarray) -> float:
    """Share of off-palette pixels in an (H, W, 3) RGB array (see the module docstring).

    Example:
        >>> off_palette_share(np.full((4, 4, 3), 128, dtype=np.uint8))
        0.0
    """
    rgb = pixels.reshape(-1, 3).astype(np.float32)
    coloured = (rgb.max(axis=1) - rgb.min(axis=1)) > CHROMA_MIN
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (4, 3)
    distance = np.sqrt(((rgb[:, None, :] - palette[None]) ** 2).sum(-1)).min(axis=1)
    return float((coloured & (distance > PALETTE_DISTANCE)).mean()) if len(rgb) else 0.0


def toy_image_problem(image: Any, size: tuple[int, int] | None = None) -> str | None:
    """Why ``image`` is not a toy scene, in a few words; None when it looks like one.

    Args:
        image: a PIL image, or a (3, H, W) uint8 tensor / array (the decoded working copy).
        size: the original ``(width, height)`` when ``image`` is a resized working copy.

    Returns:
        None, or e.g. ``"640 × 480 pixels, not a 128 × 128 toy scene"``.
    """
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"))
    else:
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        pixels = np.transpose(array, (1, 2, 0))
    width, height = size if size is not None else (pixels.shape[1], pixels.shape[0])
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        return f"{width} × {height} pixels, not a {IMAGE_SIZE} × {IMAGE_SIZE} toy scene"
    share = off_palette_share(pixels)
    if share > OFF_PALETTE_LIMIT:
        return (
            f"{share:.0%} of its pixels have colours no toy scene has "
            f"(a toy scene has none; limit {OFF_PALETTE_LIMIT:.0%})"
        )
    return None


def toy_input_check(image: Any, size: tuple[int, int] | None = None) -> str | None:
    """The toy J's :attr:`~jmllm.joint.JointModel.input_check`: the problem and
    :data:`TOY_WARNING`, or None for an image like a toy scene.

    Example:
        >>> toy_input_check(Image.new("RGB", (64, 64))).startswith("64 × 64 pixels")
        True
    """
    problem = toy_image_problem(image, size)
    return None if problem is None else f"{problem}: {TOY_WARNING}"


__all__ = ["TOY_WARNING", "off_palette_share", "toy_image_problem", "toy_input_check"]
