"""The vision side of every supported MLLM family: which vision tokens it reads, on what grids.

J (and the trainer of W) shows each multi-modal LLM the whole image *squashed to a square*, as the
paper does for LLaVA-1.5, so that every vision token covers a known region of the image. A
family's :class:`VisionLayout` lists its token grids (:class:`Block`) with the region each one
covers; W's inputs are OWL-ViT's patch tokens resampled onto those grids
(:func:`resample_patches`), and W's targets are the family's own tokens on the same grids
(:meth:`VisionFamily.tokens`). One class per transformers ``model_type``:

- ``llava`` (LLaVA-1.5): one grid, the vision tower's (24×24 for CLIP ViT-L/14-336).
- ``llava_next`` (LLaVA-NeXT / 1.6) and ``llava_onevision``: the any-res layout of the image at
  the smallest square grid pinpoint above the tower's input (672 px for LLaVA-NeXT-Mistral-7B,
  768 px for OneVision): the base grid of the whole image, then a 2×2 grid of crops, each
  covering a quarter of the image. The model's own packing (unpadding, newline tokens) follows in
  jmllm-joint.
- ``qwen2_vl`` and ``qwen2_5_vl``: dynamic resolution; the image is shown at
  :data:`QWEN_TOKEN_GRID` × 28 px (672 px), whose 2×2-merged tokens form a 24×24 grid — the
  grid of OWL-ViT B/32, so no resampling at all with the default vision side. A checkpoint may
  set another grid in its config (:data:`TOKEN_GRID_KEY`, e.g. a toy model's smaller one).

Where a grid differs from OWL-ViT's (OneVision's 27×27 base, every crop, OWLv2's 60×60 patches),
OWL-ViT's tokens are resampled bilinearly, averaged over each target cell when shrinking: an
approximation, reported as such in the docs' feature table.

Example:
    >>> from jmllm.align.testing import llava_1_5_7b_config
    >>> vision_family(llava_1_5_7b_config()).layout.num_tokens
    576
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = [
    "FAMILIES",
    "QWEN_TOKEN_GRID",
    "TOKEN_GRID_KEY",
    "Block",
    "LlavaNextVision",
    "LlavaOnevisionVision",
    "LlavaVision",
    "Qwen2VLVision",
    "Qwen25VLVision",
    "UnsupportedFamilyError",
    "VisionFamily",
    "VisionLayout",
    "family_name",
    "resample_patches",
    "vision_family",
]

QWEN_TOKEN_GRID = 24  # Qwen2-VL / 2.5-VL: 24×24 merged tokens (672 px), OWL-ViT B/32's grid
# A config attribute (saved in config.json) that sets the token grid J shows a dynamic-resolution
# family, e.g. a toy Qwen2-VL trained on small scenes; absent: QWEN_TOKEN_GRID.
TOKEN_GRID_KEY = "jmllm_token_grid"


class UnsupportedFamilyError(ValueError):
    """An MLLM whose ``model_type`` has no family here; the message lists the supported ones."""


@dataclass(frozen=True)
class Block:
    """One grid of vision tokens: ``rows`` × ``cols`` tokens in row-major order, covering
    ``region`` = (x0, y0, x1, y1), fractions of the squashed image."""

    rows: int
    cols: int
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class VisionLayout:
    """The vision tokens a family reads for one image: its square input side and its grids.

    Example:
        >>> layout = VisionLayout(336, (Block(24, 24),))
        >>> layout.num_tokens, layout.grid
        (576, (24, 24))
    """

    side: int  # pixels: the image is squashed to side × side
    blocks: tuple[Block, ...]

    @property
    def num_tokens(self) -> int:
        """Vision tokens W produces per image (every block, before the family's packing)."""
        return sum(block.tokens for block in self.blocks)

    @property
    def grid(self) -> tuple[int, int]:
        """The first (base) block's grid: what covers the whole image."""
        return self.blocks[0].rows, self.blocks[0].cols

    def describe(self) -> str:
        """One line: e.g. ``672 px: 24x24 + 4 crops of 24x24``."""
        base = f"{self.side} px: {self.blocks[0].rows}x{self.blocks[0].cols}"
        if len(self.blocks) == 1:
            return base
        crop = self.blocks[1]
        return f"{base} + {len(self.blocks) - 1} crops of {crop.rows}x{crop.cols}"


def resample_patches(
    patches: torch.Tensor, grid: tuple[int, int], layout: VisionLayout
) -> torch.Tensor:
    """OWL-ViT's patch tokens resampled onto every block of ``layout``, differentiably.

    Each target token takes the bilinear value of the source grid at its cell's centre (in
    fractions of the squashed image, the source grid covering the whole of it); where a target
    cell spans more than one source cell, it averages ``s × s`` samples over the cell (a box
    filter), so shrinking does not alias. A layout of one whole-image block of the source's own
    grid returns ``patches`` itself (exact: LLaVA-1.5 with OWL-ViT B/32, Qwen at 672 px).

    Args:
        patches: (B, H·W, D) patch tokens in row-major order (CLS dropped).
        grid: (H, W) of the source.
        layout: the target grids.

    Returns:
        (B, N, D) with N = ``layout.num_tokens``, blocks in order.

    Example:
        >>> x = torch.arange(4.0).view(1, 4, 1)  # a 2x2 grid
        >>> resample_patches(x, (2, 2), VisionLayout(28, (Block(1, 1),))).flatten().tolist()
        [1.5]
    """
    B, n, D = patches.shape
    H, W = grid
    if n != H * W:
        raise ValueError(f"patches: {n} tokens do not form the {H}x{W} grid")
    if len(layout.blocks) == 1 and layout.blocks[0] == Block(H, W):
        return patches
    image = patches.float().transpose(1, 2).reshape(B, D, H, W)  # (B, D, H, W)
    out = [_sample_block(image, block) for block in layout.blocks]  # (B, r·c, D) each
    return torch.cat(out, dim=1).to(patches.dtype)


def _sample_block(image: torch.Tensor, block: Block) -> torch.Tensor:
    B, _, H, W = image.shape
    x0, y0, x1, y1 = block.region
    # source cells per target cell, per axis: that many samples per cell, averaged
    sx = max(1, math.ceil((x1 - x0) * W / block.cols - 1e-9))
    sy = max(1, math.ceil((y1 - y0) * H / block.rows - 1e-9))
    rows, cols = block.rows * sy, block.cols * sx
    ys = y0 + (torch.arange(rows, dtype=torch.float32) + 0.5) / rows * (y1 - y0)
    xs = x0 + (torch.arange(cols, dtype=torch.float32) + 0.5) / cols * (x1 - x0)
    gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")  # grid_sample's [-1, 1]
    where = torch.stack([gx, gy], dim=-1).to(image.device).expand(B, rows, cols, 2)
    sampled = torch.nn.functional.grid_sample(
        image, where, mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, D, r·sy, c·sx)
    if sx > 1 or sy > 1:
        sampled = torch.nn.functional.avg_pool2d(sampled, (sy, sx))  # (B, D, r, c)
    return sampled.flatten(2).transpose(1, 2)  # (B, r·c, D)


class VisionFamily:
    """The vision side of one MLLM family, read from its config.

    Subclasses set :attr:`model_type` and implement :attr:`layout` and :meth:`tokens`; the
    other members follow from the config.

    Args:
        config: the MLLM's transformers config (``model_type`` must be this family's).
    """

    model_type: ClassVar[str] = ""
    # what the family is, for messages and the docs
    title: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def layout(self) -> VisionLayout:
        raise NotImplementedError

    @property
    def text_hidden_size(self) -> int:
        """The language model's width: W's output dimension."""
        return int(self.config.text_config.hidden_size)

    @property
    def vision_hidden_size(self) -> int:
        vision = self.config.vision_config
        return int(getattr(vision, "embed_dim", None) or vision.hidden_size)

    def tower(self, model: Any) -> Any:
        """The model's vision tower (where its pixels go)."""
        return model.model.vision_tower

    def tokens(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        """The family's own vision tokens of every block: (B, N, D_llm), blocks in order.

        Args:
            model: the MLLM (``...ForConditionalGeneration``), its language model optional.
            pixel_values: (B, 3, S, S) the squashed, normalised images, S = ``layout.side``.
        """
        raise NotImplementedError

    def model_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stock model's own image inputs for (B, 3, S, S) normalised squares, as its
        processor would give them (``pixel_values`` and ``image_sizes`` / ``image_grid_thw``).
        """
        return {"pixel_values": pixel_values}


def _feature_layer(hidden_states: Sequence[torch.Tensor], layer: int | Sequence[int]) -> Any:
    if isinstance(layer, int):
        return hidden_states[layer]
    return torch.cat([hidden_states[i] for i in layer], dim=-1)  # several layers concatenated


class LlavaVision(VisionFamily):
    """LLaVA-1.5: the vision tower's grid, one block (24×24 at 336 px)."""

    model_type = "llava"
    title = "LLaVA"

    @property
    def layout(self) -> VisionLayout:
        tower = self.config.vision_config
        side = tower.image_size // tower.patch_size
        return VisionLayout(int(tower.image_size), (Block(side, side),))

    def tokens(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        config = model.config
        dtype = next(model.model.vision_tower.parameters()).dtype
        features = model.model.get_image_features(
            pixel_values=pixel_values.to(dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        tokens = features.pooler_output if hasattr(features, "pooler_output") else features
        return torch.stack(list(tokens)) if isinstance(tokens, (list, tuple)) else tokens


class LlavaNextVision(VisionFamily):
    """LLaVA-NeXT: the base grid of the whole image, then a k×k grid of crops (any-res at the
    smallest square grid pinpoint larger than the tower's input; k = 2 for the published
    checkpoints)."""

    model_type = "llava_next"
    title = "LLaVA-NeXT"

    @property
    def tile(self) -> int:
        """The vision tower's input side (336 for CLIP ViT-L/14-336)."""
        return int(self.config.vision_config.image_size)

    @property
    def side(self) -> int:
        """The square any-res resolution J uses (672 for LLaVA-NeXT's pinpoints)."""
        squares = sorted(
            int(h) for h, w in self.config.image_grid_pinpoints if h == w and h % self.tile == 0
        )
        larger = [s for s in squares if s > self.tile]
        if not larger:
            raise UnsupportedFamilyError(
                f"{self.model_type}: image_grid_pinpoints {self.config.image_grid_pinpoints} "
                f"hold no square multiple of the tower's {self.tile} px above it"
            )
        return larger[0]

    @property
    def layout(self) -> VisionLayout:
        tower = self.config.vision_config
        g = tower.image_size // tower.patch_size
        k = self.side // self.tile
        crops = tuple(
            Block(g, g, (j / k, i / k, (j + 1) / k, (i + 1) / k))
            for i in range(k)
            for j in range(k)
        )  # row-major, as the processor cuts the crops
        return VisionLayout(self.side, (Block(g, g), *crops))

    def tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 1 + k², 3, t, t): the base (the square shrunk to the tower's input) and the
        crops, as the any-res processor lays them out."""
        B, C, S, _ = pixel_values.shape
        t, k = self.tile, S // self.tile
        base = torch.nn.functional.interpolate(
            pixel_values.float(), size=(t, t), mode="bicubic", antialias=True, align_corners=False
        ).to(pixel_values.dtype)  # (B, 3, t, t)
        crops = pixel_values.unfold(2, t, t).unfold(3, t, t)  # (B, 3, k, k, t, t)
        crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(B, k * k, C, t, t)
        return torch.cat([base.unsqueeze(1), crops], dim=1)

    def tokens(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        config = model.config
        tiles = self.tiles(pixel_values)  # (B, 1 + k², 3, t, t)
        B, n = tiles.shape[:2]
        tower = model.model.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(tiles.flatten(0, 1).to(dtype), output_hidden_states=True)
        hidden = _feature_layer(out.hidden_states, config.vision_feature_layer)  # (B·n, T, d)
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # CLS dropped
        tokens = model.model.multi_modal_projector(hidden)  # (B·n, g², D)
        return tokens.reshape(B, n * tokens.shape[1], tokens.shape[-1])

    def model_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        side = pixel_values.shape[-1]
        sizes = torch.tensor([[side, side]] * pixel_values.shape[0], device=pixel_values.device)
        return {"pixel_values": self.tiles(pixel_values), "image_sizes": sizes}


class LlavaOnevisionVision(LlavaNextVision):
    """LLaVA-OneVision: LLaVA-NeXT's layout (SigLIP tower, no CLS, 27×27 base grid)."""

    model_type = "llava_onevision"
    title = "LLaVA-OneVision"


class Qwen2VLVision(VisionFamily):
    """Qwen2-VL: the image at :data:`QWEN_TOKEN_GRID` merged tokens a side (patch 14, 2×2
    merge: 672 px, 24×24 tokens; the config's :data:`TOKEN_GRID_KEY` if it sets one),
    patchified the way its processor does."""

    model_type = "qwen2_vl"
    title = "Qwen2-VL"

    @property
    def patch(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def token_grid(self) -> int:
        """Merged tokens per side of the square J shows the model."""
        grid = getattr(self.config, TOKEN_GRID_KEY, None)
        if grid is None:
            return QWEN_TOKEN_GRID
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise UnsupportedFamilyError(
                f"{self.model_type}: config {TOKEN_GRID_KEY} must be a positive integer, "
                f"got {grid!r}"
            )
        return grid

    @property
    def layout(self) -> VisionLayout:
        grid = self.token_grid
        return VisionLayout(grid * self.patch * self.merge, (Block(grid, grid),))

    def tower(self, model: Any) -> Any:
        return model.model.visual

    def grid_thw(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3) ``image_grid_thw``: one temporal step, the patch grid of each square."""
        g = pixel_values.shape[-1] // self.patch
        return torch.tensor([[1, g, g]] * pixel_values.shape[0], device=pixel_values.device)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B·gh·gw, C·tp·p·p): the flat patches Qwen's processor makes of (B, 3, S, S)
        normalised images (the still image repeated over the temporal patch, patches grouped by
        2×2 merge window)."""
        B, C, H, W = pixel_values.shape
        p, m = self.patch, self.merge
        tp = int(self.config.vision_config.temporal_patch_size)
        gh, gw = H // p, W // p
        x = pixel_values.unsqueeze(1).expand(B, tp, C, H, W)  # (B, tp, C, H, W)
        x = x.reshape(B, tp, C, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (B, gh/m, gw/m, m, m, C, tp, p, p)
        return x.reshape(B * gh * gw, C * tp * p * p)

    def tokens(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(model.model.visual.parameters()).dtype
        out = model.model.get_image_features(
            self.patchify(pixel_values).to(dtype), self.grid_thw(pixel_values)
        )
        return torch.stack(list(out.pooler_output))  # (B, N, D): raster order of merged tokens

    def model_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.patchify(pixel_values),
            "image_grid_thw": self.grid_thw(pixel_values),
        }


class Qwen25VLVision(Qwen2VLVision):
    """Qwen2.5-VL: Qwen2-VL's layout (window attention inside the tower changes nothing here)."""

    model_type = "qwen2_5_vl"
    title = "Qwen2.5-VL"


FAMILIES: dict[str, type[VisionFamily]] = {
    cls.model_type: cls
    for cls in (LlavaVision, LlavaNextVision, LlavaOnevisionVision, Qwen2VLVision, Qwen25VLVision)
}


def family_name(config: Any) -> str:
    """The family (``model_type``) of an MLLM config, refused with one line if unsupported.

    Raises:
        UnsupportedFamilyError: naming the model type and the supported families.

    Example:
        >>> from jmllm.align.testing import llava_1_5_7b_config
        >>> family_name(llava_1_5_7b_config())
        'llava'
    """
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type not in FAMILIES:
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} is not a supported multi-modal LLM family "
            f"(supported: {', '.join(FAMILIES)})"
        )
    return model_type


def vision_family(config: Any) -> VisionFamily:
    """The :class:`VisionFamily` of an MLLM config.

    Raises:
        UnsupportedFamilyError: an unsupported ``model_type`` (one line listing the supported).
    """
    return FAMILIES[family_name(config)](config)
