"""GA's maps: the weightings (``class``, ``coord``, ``any``) and every patch painting its box."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from jmllm.joint.saliency.gradients import minmax

# ---------------------------------------------------------------------------------------------
# Maps: every patch paints its predicted box with its weight
# ---------------------------------------------------------------------------------------------

Weighting = Literal["class", "coord", "any"]
WEIGHTINGS: tuple[str, ...] = ("class", "coord", "any")
# With several queries, which class channel weighs a box: the query naming the object the
# explained word refers to (resolved per result: GAResult.class_match), the first query's (the
# letter of the authors' one-query class_id=[0]) or the maximum over the queries.
# "objectness": OWLv2's objectness channel instead of a class channel (query-independent; J
# with OWL-ViT, which has no objectness head, refuses it).
CLASS_QUERY_MODES: tuple[str, ...] = ("matching", "first", "max", "objectness")
# Box corners to pixels: int() truncation as the authors' scripts, or floor/ceil outward.
BOX_ROUNDINGS: tuple[str, ...] = ("truncate", "outward")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def patch_weights(
    normalised: torch.Tensor,
    num_queries: int,
    weighting: str,
    query: int | str | None = "first",
) -> torch.Tensor:
    """Per-patch box weight (N,) from the normalised similarity table (N, Q + 4).

    - ``class``: the class channel of ``query``: an index, ``"first"`` (the first query),
      ``"max"`` (the maximum over the query channels) or ``"objectness"`` (OWLv2's objectness
      channel, the table's column Q + 4); ``None`` means ``"first"``. The
      ``"matching"`` channel depends on the explained word, so it is resolved to an index (or
      ``"max"``) by the result (:meth:`GAResult.channel`) before it reaches this table.
    - ``coord``: the maximum over the four box channels ``cx, cy, w, h``.
    - ``any``: the maximum over all Q + 4 channels (with OWLv2, Q + 5: its objectness too),
      i.e. ``max(class channels, coord)`` — the
      patch counts if its gradient aligns with the token's through any of its outputs (the
      authors' ``anyweight``).

    Example:
        >>> table = torch.tensor([[0.2, 0.9, 0.1, 0.0, 0.0, 0.0]])  # 2 queries + 4 box channels
        >>> patch_weights(table, 2, "class"), patch_weights(table, 2, "class", "max")
        (tensor([0.2000]), tensor([0.9000]))
    """
    if weighting == "class":
        cls = normalised[:, :num_queries]
        if query is None or query == "first":
            return cls[:, 0]
        if query == "max":
            return cls.max(-1).values
        if query == "objectness":
            if normalised.shape[1] <= num_queries + 4:
                raise ValueError(
                    "class_query: 'objectness' needs OWLv2's objectness head; OWL-ViT has none"
                )
            return normalised[:, num_queries + 4]
        if query == "matching":
            raise ValueError(
                "class_query: 'matching' depends on the explained word; resolve it with "
                "GAResult.channel() (or pass a query index)"
            )
        if isinstance(query, bool) or not isinstance(query, int):
            raise ValueError(
                f"class_query: {query!r} is neither a query index nor one of "
                f"{', '.join(CLASS_QUERY_MODES)}"
            )
        return cls[:, query]
    if weighting == "coord":
        return normalised[:, num_queries : num_queries + 4].max(-1).values
    if weighting == "any":
        return normalised.max(-1).values
    raise ValueError(f"weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")


def box_pixels(
    boxes: torch.Tensor, image_size: tuple[int, int], rounding: str = "truncate"
) -> np.ndarray:
    """(N, 4) ``cx, cy, w, h`` in [0, 1] to integer pixel corners ``x0, y0, x1, y1`` (N, 4),
    x scaled by the width and y by the height (the image was squashed), clipped to the image.
    A box covers rows ``y0:y1`` and columns ``x0:x1`` (the end excluded).

    Args:
        boxes: (N, 4) boxes.
        image_size: (width, height) in pixels.
        rounding: ``"truncate"`` (default): the authors' ``int(width * (cx - w / 2))``, computed
            in float32 as their torch tensors are, truncated toward zero; ``"outward"``: floor the
            top-left and ceil the bottom-right corner in float64, so a box never loses a pixel
            it partly covers (1 px wider at right and bottom).

    Example:
        >>> b = torch.tensor([[0.5, 0.5, 0.35, 0.35]])
        >>> box_pixels(b, (10, 10)).tolist(), box_pixels(b, (10, 10), "outward").tolist()
        ([[3, 3, 6, 6]], [[3, 3, 7, 7]])
    """
    _check_choice("box_rounding", rounding, BOX_ROUNDINGS)
    width, height = image_size
    if rounding == "truncate":
        t = boxes.detach().float().cpu()  # (N, 4) float32, the dtype of the authors' boxes
        corners = [
            width * (t[:, 0] - t[:, 2] / 2),
            height * (t[:, 1] - t[:, 3] / 2),
            width * (t[:, 0] + t[:, 2] / 2),
            height * (t[:, 1] + t[:, 3] / 2),
        ]
        xyxy = torch.stack([torch.trunc(c) for c in corners], dim=1).numpy().astype(np.float64)
    else:
        b = boxes.detach().float().cpu().numpy().astype(np.float64)
        x0 = np.floor(width * (b[:, 0] - b[:, 2] / 2))
        x1 = np.ceil(width * (b[:, 0] + b[:, 2] / 2))
        y0 = np.floor(height * (b[:, 1] - b[:, 3] / 2))
        y1 = np.ceil(height * (b[:, 1] + b[:, 3] / 2))
        xyxy = np.stack([x0, y0, x1, y1], axis=1)
    xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, width)
    xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, height)
    return xyxy.astype(np.int64)


def paint_boxes(
    weights: torch.Tensor | np.ndarray, boxes_xyxy: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """Pixel-wise maximum of boxes each filled with its weight: (H, W) float32, 0 off every box.

    Painting in increasing weight order with plain assignment gives the maximum directly.
    """
    width, height = image_size
    canvas = np.zeros((height, width), dtype=np.float32)
    w = np.asarray(
        weights.detach().float().cpu() if isinstance(weights, torch.Tensor) else weights,
        dtype=np.float32,
    )
    for i in np.argsort(w, kind="stable"):
        x0, y0, x1, y1 = boxes_xyxy[i]
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = w[i]
    return canvas


def patch_grid_map(
    values: torch.Tensor | np.ndarray, image_size: tuple[int, int], pads_to_square: bool = False
) -> np.ndarray:
    """Per-patch values (N,) on the G×G grid, min–max normalised, upsampled (nearest) to the
    original (H, W): each patch covers its cell of the squashed image (``pads_to_square``,
    OWLv2: of the image padded to a square, bottom and right, so the grid's cells are square
    and the padding's are not drawn).

    Example:
        >>> grid = np.array([0.0, 1.0, 2.0, 3.0])  # a 2x2 grid, on a 4x2 image
        >>> (patch_grid_map(grid, (4, 2)) * 3).round().tolist()  # squashed: both rows shown
        [[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]]
        >>> (patch_grid_map(grid, (4, 2), pads_to_square=True) * 3).round().tolist()  # top row
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    """
    v = np.asarray(values.detach().float().cpu() if isinstance(values, torch.Tensor) else values)
    side = round(v.size**0.5)
    if side * side != v.size:
        raise ValueError(f"values: {v.size} patches do not form a square grid")
    v = minmax(torch.from_numpy(v.astype(np.float32))).numpy().reshape(side, side)
    width, height = image_size
    span_x, span_y = (max(width, height),) * 2 if pads_to_square else (width, height)
    rows = np.minimum((np.arange(height) * side) // span_y, side - 1)
    cols = np.minimum((np.arange(width) * side) // span_x, side - 1)
    return v[rows][:, cols].astype(np.float32)
