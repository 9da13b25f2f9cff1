"""The alignment layer W: maps OWL-ViT vision tokens into an MLLM's vision-token space.

Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024, arXiv 2405.14612), supplementary §1 and Table 1. The paper's three
architectures, each exactly as the authors built it (their ``projection_modules.py``), plus one of
the project's own:

- ``deep-mlp``: the paper's W. Token-wise MLP, hidden 8192, two hidden layers (judge score 6.1).
- ``llava-mlp``: LLaVA-1.5's own projector shape, Linear + GELU + Linear (5.6).
- ``transformer``: the authors' small transformer (3.2): Linear(in→4096), two post-norm
  ``nn.TransformerEncoderLayer`` (width 4096, 8 heads, feed-forward 4096, ReLU, dropout 0.1, no
  position embeddings), Linear(4096→out). Token-wise: see :class:`TokenwiseTransformer`.
- ``sequence-transformer``: the project's transformer over the whole token sequence (pre-norm,
  learned positions, width 1024, 16 heads). Not in the paper; files written before the weight
  format's version 2 call it ``transformer`` and still load as this architecture.

Dimensions always come from the two models' configs (:func:`alignment_config_for`); 768 and
4096 are only what OWL-ViT B/32 and LLaVA-1.5-7b give. The MLLM may be of any supported family
(:mod:`jmllm.align.families`); W records it and refuses to fit another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from jmllm.align.families import VisionLayout, family_name, vision_family

Architecture = Literal["deep-mlp", "llava-mlp", "transformer", "sequence-transformer"]
ARCHITECTURES: tuple[str, ...] = ("deep-mlp", "llava-mlp", "transformer", "sequence-transformer")
TRANSFORMERS = ("transformer", "sequence-transformer")
# A W above this size is refused from its config, before anything is allocated (10 G parameters,
# 40 GB in float32; the paper's W has 174 M).
MAX_PARAMETERS = 10**10


@dataclass
class AlignmentConfig:
    """What a W is: enough to rebuild it from scratch (stored in the weights file's metadata)."""

    architecture: str = "deep-mlp"
    in_dim: int = 768  # OWL-ViT vision hidden size (B/32: 768)
    out_dim: int = 4096  # LLaVA language model hidden size (LLaVA-1.5-7b: 4096)
    hidden_dim: int = 8192  # deep-mlp width (paper: 8192); transformers: model width
    num_hidden_layers: int = 2  # deep-mlp: hidden 8192→8192 blocks; transformers: encoder layers
    num_heads: int = 8  # transformers only (the authors': 8)
    num_tokens: int = (
        576  # tokens W sees per image (CLS dropped); sequence-transformer: its positions
    )
    # Transformers only; None: the architecture's own (transformer: feed-forward = hidden_dim and
    # dropout 0.1, as the authors' nn.TransformerEncoderLayer(d, 8, dim_feedforward=d);
    # sequence-transformer: 4 × hidden_dim and no dropout).
    ffn_dim: int | None = None
    dropout: float | None = None
    # Provenance of the two sides, checked when W is attached to models.
    source_model: str = ""  # e.g. google/owlvit-base-patch32
    source_layer: int = -2  # OWL-ViT hidden state W reads (penultimate)
    target_model: str = ""  # e.g. llava-hf/llava-1.5-7b-hf
    drop_cls: bool = True  # W consumes patch tokens only
    # The MLLM family (transformers model_type) whose vision tokens W was trained to give; files
    # written before the field existed are LLaVA-1.5's.
    family: str = "llava"

    def __post_init__(self) -> None:
        """Check every field's type and range, and the size of the network it describes (a
        ``ValueError`` naming the field, before anything is allocated)."""
        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown alignment architecture {self.architecture!r}; "
                f"expected one of {', '.join(ARCHITECTURES)}"
            )
        for name in (
            "in_dim",
            "out_dim",
            "hidden_dim",
            "num_hidden_layers",
            "num_heads",
            "num_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"alignment config {name} must be a positive integer, got {value!r}"
                )
        if isinstance(self.source_layer, bool) or not isinstance(self.source_layer, int):
            raise ValueError(
                f"alignment config source_layer must be an integer, got {self.source_layer!r}"
            )
        for name in ("source_model", "target_model", "family"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(
                    f"alignment config {name} must be text, got {getattr(self, name)!r}"
                )
        if not isinstance(self.drop_cls, bool):
            raise ValueError(
                f"alignment config drop_cls must be true or false, got {self.drop_cls!r}"
            )
        if self.architecture in TRANSFORMERS:
            if self.hidden_dim % self.num_heads:
                raise ValueError(
                    f"{self.architecture} hidden_dim {self.hidden_dim} is not divisible by "
                    f"num_heads {self.num_heads}"
                )
            authors = self.architecture == "transformer"
            if self.ffn_dim is None:
                self.ffn_dim = self.hidden_dim if authors else 4 * self.hidden_dim
            if self.dropout is None:
                self.dropout = 0.1 if authors else 0.0
            if (
                isinstance(self.ffn_dim, bool)
                or not isinstance(self.ffn_dim, int)
                or self.ffn_dim <= 0
            ):
                raise ValueError(
                    f"alignment config ffn_dim must be a positive integer, got {self.ffn_dim!r}"
                )
            if (
                isinstance(self.dropout, bool)
                or not isinstance(self.dropout, (int, float))
                or not 0.0 <= float(self.dropout) < 1.0
            ):
                raise ValueError(
                    f"alignment config dropout must be in [0, 1), got {self.dropout!r}"
                )
        count = self.num_parameters()
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"alignment config ({self.architecture}, in_dim={self.in_dim}, "
                f"out_dim={self.out_dim}, hidden_dim={self.hidden_dim}, "
                f"num_hidden_layers={self.num_hidden_layers}) has {count:.3g} parameters; "
                f"the limit is {MAX_PARAMETERS:.0e} (the paper's W has 1.74e+08)"
            )

    def num_parameters(self) -> int:
        """Parameters of the network this config describes, counted without building it.

        Example:
            >>> AlignmentConfig().num_parameters()  # the paper's W, 768 -> 4096
            174092288
        """
        i, o, h, n = self.in_dim, self.out_dim, self.hidden_dim, self.num_hidden_layers
        if self.architecture == "deep-mlp":
            return i * h + h + n * (h * h + h) + h * o + o
        if self.architecture == "llava-mlp":
            return i * o + o + o * o + o
        # transformers: projections in and out; per layer attention (4 h x h + biases), the
        # feed-forward (h -> f -> h) and two layer norms; the sequence one adds its positions
        f = self.ffn_dim if isinstance(self.ffn_dim, int) else h
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        positions = self.num_tokens * h if self.architecture == "sequence-transformer" else 0
        return i * h + h + positions + n * per_layer + h * o + o

    @property
    def token_wise(self) -> bool:
        """Whether every token is mapped on its own (all but ``sequence-transformer``)."""
        return self.architecture != "sequence-transformer"

    def fits_tokens(self, num_tokens: int) -> bool:
        """Token-wise layers take any sequence length; the sequence transformer only its own."""
        return self.token_wise or self.num_tokens == num_tokens

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


class TokenwiseTransformer(nn.Module):
    """The authors' transformer W, computed the way their code computes it for one image.

    Their module (``TransformerProjectionModule``) is ``linear_in``, an ``nn.TransformerEncoder``
    of ``nn.TransformerEncoderLayer(d_model=h, nhead=8, dim_feedforward=h)`` (PyTorch's defaults:
    post-norm, ReLU, dropout 0.1, no position embeddings) and ``linear_out``. The layer is built
    without ``batch_first``, so a (B, N, h) input is read as a sequence of B over a batch of N:
    attention runs across the images of a batch at each token position. At batch 1, how the
    authors caption, explain and assess, every token is a sequence of one, whose attention
    over its single key returns its value: the network is token-wise. This class computes exactly
    that for any batch: every token is its own length-1 sequence, so images never leak into each
    other and imported weights give the authors' batch-1 outputs whatever the batch size.

    The submodules carry the authors' names (``linear_in``, ``transformer_encoder.layers.N.*``,
    ``linear_out``); their state dict's unused ``transformer_layer.*`` (the template layer that
    ``nn.TransformerEncoder`` copies) is not kept.
    """

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        assert config.ffn_dim is not None and config.dropout is not None
        self.hidden_dim = config.hidden_dim
        self.linear_in = nn.Linear(config.in_dim, config.hidden_dim)
        layer = nn.TransformerEncoderLayer(
            d_model=config.hidden_dim,
            nhead=config.num_heads,
            dim_feedforward=config.ffn_dim,
            dropout=config.dropout,
        )  # batch_first=False, norm_first=False, activation relu: the authors' construction
        self.transformer_encoder = nn.TransformerEncoder(
            layer, num_layers=config.num_hidden_layers, enable_nested_tensor=False
        )
        self.linear_out = nn.Linear(config.hidden_dim, config.out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-1]  # (B, S)
        x = self.linear_in(tokens).reshape(1, -1, self.hidden_dim)  # (1, B·S, h): seq-first
        x = self.transformer_encoder(x)  # every token a sequence of length 1
        return self.linear_out(x).reshape(*lead, -1)  # (B, S, out)


class SequenceTransformer(nn.Module):
    """The project's whole-sequence W (``sequence-transformer``, not in the paper): input
    projection, pre-norm encoder layers with learned positions, output projection.

    Unlike the other architectures it mixes the tokens of an image, so it only accepts sequences
    of ``num_tokens`` tokens.
    """

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.num_tokens = config.num_tokens
        self.input_projection = nn.Linear(config.in_dim, config.hidden_dim)
        self.positions = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_dim))
        layer = nn.TransformerEncoderLayer(
            d_model=config.hidden_dim,
            nhead=config.num_heads,
            dim_feedforward=config.ffn_dim or 4 * config.hidden_dim,
            batch_first=True,
            norm_first=True,
            dropout=config.dropout or 0.0,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=config.num_hidden_layers, enable_nested_tensor=False
        )
        self.output_projection = nn.Linear(config.hidden_dim, config.out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-2] != self.num_tokens:
            raise ValueError(
                f"sequence-transformer alignment expects {self.num_tokens} tokens per image, "
                f"got {tokens.shape[-2]}"
            )
        x = self.input_projection(tokens) + self.positions  # (B, S, h)
        x = self.encoder(x)  # (B, S, h)
        return self.output_projection(x)  # (B, S, out)


_CLASSES: dict[str, type[nn.Module]] = {
    "deep-mlp": DeepMLP,
    "llava-mlp": LlavaMLP,
    "transformer": TokenwiseTransformer,
    "sequence-transformer": SequenceTransformer,
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
        """Whether every token is mapped independently or the sequence is mixed."""
        return self.config.token_wise

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
    out_dim: int  # the MLLM's text hidden size
    source_grid: tuple[int, int]  # OWL-ViT patch grid (rows, cols)
    target_grid: tuple[int, int]  # the MLLM's base vision-token grid (the whole image)
    target_vision_dim: int = 0  # the MLLM's vision-tower hidden size (for information)
    notes: list[str] = field(default_factory=list)
    family: str = "llava"  # the MLLM's model_type
    layout: VisionLayout | None = None  # every grid W fills (blocks, regions)

    @property
    def num_tokens(self) -> int:
        """Tokens W maps per image: every block of the family's layout."""
        if self.layout is not None:
            return self.layout.num_tokens
        return self.target_grid[0] * self.target_grid[1]

    @property
    def resampled(self) -> bool:
        """Whether OWL-ViT's grid is resampled onto the family's (an approximation)."""
        return self.layout is not None and (
            len(self.layout.blocks) > 1 or self.layout.grid != self.source_grid
        )


def encoder_dims(owl_config: Any, mllm_config: Any) -> EncoderDims:
    """Read the dimensions of W from an ``OwlViTConfig`` and an MLLM config of any family.

    OWL-ViT's patch grid and the family's grids may differ: W's inputs are then OWL-ViT's
    tokens resampled onto the family's grids (:func:`jmllm.align.families.resample_patches`),
    which ``notes`` says.

    Raises:
        UnsupportedFamilyError: the MLLM's ``model_type`` is not a supported family.

    Example:
        >>> from transformers import OwlViTConfig
        >>> from jmllm.align.testing import llava_1_5_7b_config
        >>> encoder_dims(OwlViTConfig(), llava_1_5_7b_config()).num_tokens
        576
    """
    vision = owl_config.vision_config
    side = vision.image_size // vision.patch_size
    family = vision_family(mllm_config)
    layout = family.layout
    dims = EncoderDims(
        in_dim=vision.hidden_size,
        out_dim=family.text_hidden_size,
        source_grid=(side, side),
        target_grid=layout.grid,
        target_vision_dim=family.vision_hidden_size,
        family=family.model_type,
        layout=layout,
    )
    if dims.resampled:
        dims.notes.append(
            f"OWL-ViT's {side}x{side} patches are resampled onto {family.title}'s grids "
            f"({layout.describe()})"
        )
    return dims


def alignment_config_for(
    owl_config: Any,
    mllm_config: Any,
    architecture: str = "deep-mlp",
    *,
    source_model: str = "",
    target_model: str = "",
    **overrides: Any,
) -> AlignmentConfig:
    """An :class:`AlignmentConfig` whose dimensions come from the two models' configs: the
    preset of the MLLM's family (its text width and every token grid W fills).

    Example:
        >>> from transformers import OwlViTConfig
        >>> from jmllm.align.testing import llava_1_5_7b_config
        >>> c = alignment_config_for(OwlViTConfig(), llava_1_5_7b_config())
        >>> (c.in_dim, c.out_dim, c.num_tokens)
        (768, 4096, 576)
    """
    dims = encoder_dims(owl_config, mllm_config)
    defaults: dict[str, Any] = {"hidden_dim": 8192, "num_hidden_layers": 2}
    if architecture == "transformer":  # the authors' TransformerProjectionModule defaults
        defaults = {"hidden_dim": 4096, "num_hidden_layers": 2, "num_heads": 8}
    elif architecture == "sequence-transformer":
        defaults = {"hidden_dim": 1024, "num_hidden_layers": 2, "num_heads": 16}
    defaults.update(overrides)
    return AlignmentConfig(
        architecture=architecture,
        in_dim=dims.in_dim,
        out_dim=dims.out_dim,
        num_tokens=dims.num_tokens,
        source_model=source_model,
        target_model=target_model,
        family=dims.family,
        **defaults,
    )


def check_fits(config: AlignmentConfig, owl_config: Any, mllm_config: Any) -> None:
    """Raise ``ValueError`` naming the dimension (or the family) if W does not fit the two models.

    A W trained for one MLLM family is refused for another in one line, before any dimension.

    Example:
        >>> from jmllm.align.testing import llava_1_5_7b_config, owlvit_b32_config
        >>> owl, mllm = owlvit_b32_config(), llava_1_5_7b_config()
        >>> check_fits(alignment_config_for(owl, mllm), owl, mllm)  # passes silently
    """
    family = family_name(mllm_config)
    if config.family != family:
        raise ValueError(
            f"alignment weights were trained for the {config.family!r} family "
            f"({config.target_model or 'model not recorded'}), not for this {family!r} model; "
            f"train a W for it with jmllm-align"
        )
    dims = encoder_dims(owl_config, mllm_config)
    problems = []
    if config.in_dim != dims.in_dim:
        problems.append(
            f"input dimension {config.in_dim} != OWL-ViT vision hidden size {dims.in_dim}"
        )
    if config.out_dim != dims.out_dim:
        problems.append(
            f"output dimension {config.out_dim} != {vision_family(mllm_config).title} text hidden size {dims.out_dim}"
        )
    if not config.fits_tokens(dims.num_tokens):
        problems.append(f"num_tokens {config.num_tokens} != {dims.num_tokens} image tokens")
    if problems:
        raise ValueError("alignment weights do not fit the models: " + "; ".join(problems))
