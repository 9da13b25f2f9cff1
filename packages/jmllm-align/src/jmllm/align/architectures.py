"""The alignment layer W: maps OWL-ViT vision tokens into LLaVA's image-token space.

Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024, arXiv 2405.14612), supplementary §1 and Table 1. Three architectures:

- ``deep-mlp``: the paper's W. Token-wise MLP, hidden 8192, two hidden layers (judge score 6.1).
- ``llava-mlp``: LLaVA-1.5's own projector shape, Linear + GELU + Linear (5.6).
- ``transformer``: a small encoder over the whole token sequence (3.2).

Dimensions always come from the two models' configs (:func:`alignment_config_for`); 768 and
4096 are only what OWL-ViT B/32 and LLaVA-1.5-7b give.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Architecture = Literal["deep-mlp", "llava-mlp", "transformer"]
ARCHITECTURES: tuple[str, ...] = ("deep-mlp", "llava-mlp", "transformer")


@dataclass
class AlignmentConfig:
    """What a W is: enough to rebuild it from scratch (stored in the weights file's metadata)."""

    architecture: str = "deep-mlp"
    in_dim: int = 768  # OWL-ViT vision hidden size (B/32: 768)
    out_dim: int = 4096  # LLaVA language model hidden size (LLaVA-1.5-7b: 4096)
    hidden_dim: int = 8192  # deep-mlp width (paper: 8192); transformer model width
    num_hidden_layers: int = 2  # deep-mlp: hidden 8192→8192 blocks; transformer: encoder layers
    num_heads: int = 8  # transformer only
    num_tokens: int = (
        576  # tokens W sees per image (CLS dropped); needed by the transformer's positions
    )
    # Provenance of the two sides, checked when W is attached to models.
    source_model: str = ""  # e.g. google/owlvit-base-patch32
    source_layer: int = -2  # OWL-ViT hidden state W reads (penultimate)
    target_model: str = ""  # e.g. llava-hf/llava-1.5-7b-hf
    drop_cls: bool = True  # W consumes patch tokens only

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown alignment architecture {self.architecture!r}; "
                f"expected one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("in_dim", "out_dim", "hidden_dim", "num_hidden_layers", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"alignment config {name} must be a positive integer, got {value!r}"
                )
        if self.architecture == "transformer" and self.hidden_dim % self.num_heads:
            raise ValueError(
                f"transformer hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}"
            )

    def fits_tokens(self, num_tokens: int) -> bool:
        """Token-wise MLPs take any sequence length; the transformer only its own."""
        return self.architecture != "transformer" or self.num_tokens == num_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignmentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"alignment config has unknown fields: {', '.join(unknown)}")
        return cls(**data)


class DeepMLP(nn.Module):
    """The paper's W: Linear(in→h)+ReLU, N × [Linear(h→h)+ReLU], Linear(h→out), per token."""

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.input_layer = nn.Linear(config.in_dim, config.hidden_dim)
        self.hidden_layers = nn.ModuleList(
            nn.Linear(config.hidden_dim, config.hidden_dim) for _ in range(config.num_hidden_layers)
        )
        self.output_layer = nn.Linear(config.hidden_dim, config.out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.input_layer(tokens))  # (B, S, in) -> (B, S, h)
        for layer in self.hidden_layers:
            x = torch.relu(layer(x))  # (B, S, h)
        return self.output_layer(x)  # (B, S, out)


class LlavaMLP(nn.Module):
    """LLaVA-1.5's projector shape: Linear(in→out) + GELU + Linear(out→out), per token."""

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(config.in_dim, config.out_dim)
        self.linear_2 = nn.Linear(config.out_dim, config.out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.gelu(self.linear_1(tokens)))  # (B, S, in) -> (B, S, out)


class SequenceTransformer(nn.Module):
    """Whole-sequence W: input projection, encoder layers with learned positions, output projection.

    Unlike the MLPs it mixes tokens, so it only accepts sequences of ``num_tokens`` tokens.
    """

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.num_tokens = config.num_tokens
        self.input_projection = nn.Linear(config.in_dim, config.hidden_dim)
        self.positions = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_dim))
        layer = nn.TransformerEncoderLayer(
            d_model=config.hidden_dim,
            nhead=config.num_heads,
            dim_feedforward=4 * config.hidden_dim,
            batch_first=True,
            norm_first=True,
            dropout=0.0,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=config.num_hidden_layers, enable_nested_tensor=False
        )
        self.output_projection = nn.Linear(config.hidden_dim, config.out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-2] != self.num_tokens:
            raise ValueError(
                f"transformer alignment expects {self.num_tokens} tokens per image, got {tokens.shape[-2]}"
            )
        x = self.input_projection(tokens) + self.positions  # (B, S, h)
        x = self.encoder(x)  # (B, S, h)
        return self.output_projection(x)  # (B, S, out)


_CLASSES: dict[str, type[nn.Module]] = {
    "deep-mlp": DeepMLP,
    "llava-mlp": LlavaMLP,
    "transformer": SequenceTransformer,
}


class AlignmentLayer(nn.Module):
    """W with its config: ``AlignmentLayer(config)(t_patches)`` maps (B, S, in) → (B, S, out).

    Args:
        config: the architecture and its dimensions.

    Example:
        >>> import torch
        >>> w = AlignmentLayer(AlignmentConfig("llava-mlp", in_dim=8, out_dim=16, num_tokens=4))
        >>> w(torch.zeros(2, 4, 8)).shape
        torch.Size([2, 4, 16])
    """

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.config = config
        self.net = _CLASSES[config.architecture](config)
        self.provenance: dict[str, Any] = {}  # how the weights were made (from the weights file)

    @property
    def token_wise(self) -> bool:
        """Whether every token is mapped independently (MLPs) or the sequence is mixed."""
        return self.config.architecture != "transformer"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.config.in_dim:
            raise ValueError(
                f"alignment layer expects tokens of dimension {self.config.in_dim}, got {tokens.shape[-1]}"
            )
        return self.net(tokens)


@dataclass
class EncoderDims:
    """The dimensions W must fit, read from the two models' configs."""

    in_dim: int  # OWL-ViT vision hidden size
    out_dim: int  # LLaVA text hidden size
    source_grid: tuple[int, int]  # OWL-ViT patch grid (rows, cols)
    target_grid: tuple[int, int]  # LLaVA vision-tower patch grid
    target_vision_dim: int = 0  # LLaVA vision-tower hidden size (for information)
    notes: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.source_grid[0] * self.source_grid[1]


def encoder_dims(owl_config: Any, llava_config: Any) -> EncoderDims:
    """Read the dimensions of W from an ``OwlViTConfig`` and a ``LlavaConfig``.

    Raises:
        ValueError: if the two token grids differ (W is token-wise, so the grids must match).

    Example:
        >>> from transformers import OwlViTConfig
        >>> from jmllm.align.testing import llava_1_5_7b_config
        >>> encoder_dims(OwlViTConfig(), llava_1_5_7b_config()).num_tokens
        576
    """
    vision = owl_config.vision_config
    side = vision.image_size // vision.patch_size
    tower = llava_config.vision_config
    target_side = tower.image_size // tower.patch_size
    dims = EncoderDims(
        in_dim=vision.hidden_size,
        out_dim=llava_config.text_config.hidden_size,
        source_grid=(side, side),
        target_grid=(target_side, target_side),
        target_vision_dim=tower.hidden_size,
    )
    if dims.source_grid != dims.target_grid:
        raise ValueError(
            f"token grids differ: OWL-ViT gives {side}x{side} patches "
            f"({vision.image_size} px / patch {vision.patch_size}) but LLaVA's vision tower gives "
            f"{target_side}x{target_side} ({tower.image_size} px / patch {tower.patch_size})"
        )
    return dims


def alignment_config_for(
    owl_config: Any,
    llava_config: Any,
    architecture: str = "deep-mlp",
    *,
    source_model: str = "",
    target_model: str = "",
    **overrides: Any,
) -> AlignmentConfig:
    """An :class:`AlignmentConfig` whose dimensions come from the two models' configs.

    Example:
        >>> from transformers import OwlViTConfig
        >>> from jmllm.align.testing import llava_1_5_7b_config
        >>> c = alignment_config_for(OwlViTConfig(), llava_1_5_7b_config())
        >>> (c.in_dim, c.out_dim, c.num_tokens)
        (768, 4096, 576)
    """
    dims = encoder_dims(owl_config, llava_config)
    defaults: dict[str, Any] = {"hidden_dim": 8192, "num_hidden_layers": 2}
    if architecture == "transformer":
        defaults = {"hidden_dim": 1024, "num_hidden_layers": 2, "num_heads": 16}
    defaults.update(overrides)
    return AlignmentConfig(
        architecture=architecture,
        in_dim=dims.in_dim,
        out_dim=dims.out_dim,
        num_tokens=dims.num_tokens,
        source_model=source_model,
        target_model=target_model,
        **defaults,
    )


def check_fits(config: AlignmentConfig, owl_config: Any, llava_config: Any) -> None:
    """Raise ``ValueError`` naming the dimension if W does not fit the two models."""
    dims = encoder_dims(owl_config, llava_config)
    problems = []
    if config.in_dim != dims.in_dim:
        problems.append(
            f"input dimension {config.in_dim} != OWL-ViT vision hidden size {dims.in_dim}"
        )
    if config.out_dim != dims.out_dim:
        problems.append(
            f"output dimension {config.out_dim} != LLaVA text hidden size {dims.out_dim}"
        )
    if not config.fits_tokens(dims.num_tokens):
        problems.append(f"num_tokens {config.num_tokens} != {dims.num_tokens} image tokens")
    if problems:
        raise ValueError("alignment weights do not fit the models: " + "; ".join(problems))
