"""Images in, the two token sequences W is trained between out (DESIGN §1.1).

- Source ``t``: OWL-ViT's vision encoder, penultimate hidden state, (B, 1 + N, D_owl) incl. CLS;
  W reads its patch tokens resampled onto the MLLM family's grids
  (:meth:`FeatureExtractor.w_inputs`; unchanged when the grids agree, as for LLaVA-1.5).
- Target: the MLLM's own vision tokens, i.e. the (B, N, D_llm) tokens it feeds its language
  model (LLaVA: vision tower at its feature layer + projector), on every grid of its family's
  layout (:mod:`jmllm.align.families`).

Preprocessing: each image is decoded once, under the image policy of :mod:`jmllm.align.images`
(pixel limit from the header, reduced JPEG decoding, one shrink to the working size), to a uint8
tensor; each model then gets the whole
image *squashed* to its square input size (no centre crop, so both token grids cover the same
regions), normalised with its own mean/std. The named preprocessing
(:mod:`jmllm.align.preprocessing`) decides the EXIF orientation and the resize: ``exif`` resizes
on tensors, batched per model; ``authors`` with PIL, exactly as the Hugging Face image
processors do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from jmllm.align.families import VisionFamily, resample_patches, vision_family

# re-exported: the image policy lives in jmllm.align.images
from jmllm.align.hub import prepare_hub
from jmllm.align.images import ImageLoadError, load_image
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, Preprocessing, get_preprocessing

__all__ = [
    "OWL_MODEL_TYPES",
    "FeatureExtractor",
    "FeaturePair",
    "ImageLoadError",
    "ImageNormalization",
    "ModelLoadError",
    "PaddedSquareNormalization",
    "image_to_tensor",
    "llava_image_tokens",
    "load_image",
    "owl_base_model",
    "owl_detector_class",
    "owl_normalization",
    "owl_penultimate",
]

# The vision sides J reads t from, by config ``model_type``: OWL-ViT (the paper's) and OWLv2.
OWL_MODEL_TYPES: tuple[str, ...] = ("owlvit", "owlv2")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (decoded once, shared by both models)."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ImageNormalization:
    """How one model wants its pixels: square side, mean and std, and the factor that scales
    8-bit pixels to [0, 1] (from its image processor).

    Example:
        >>> norm = ImageNormalization(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> pixels = [torch.zeros(3, 20, 30, dtype=torch.uint8)]
        >>> norm(pixels).shape, norm(pixels, preprocessing="authors").shape
        (torch.Size([1, 3, 8, 8]), torch.Size([1, 3, 8, 8]))
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike[str], size: int, **kwargs: Any
    ) -> ImageNormalization:
        """Read mean/std (and the rescale factor) from a checkpoint's image processor; ``size``
        comes from the model config."""
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        factor = getattr(processor, "rescale_factor", None)
        return cls(
            size=size,
            mean=tuple(processor.image_mean),  # type: ignore[arg-type]
            std=tuple(processor.image_std),  # type: ignore[arg-type]
            rescale_factor=float(factor) if factor else 1 / 255,
        )

    def __call__(
        self,
        images: list[torch.Tensor],
        device: torch.device | str = "cpu",
        preprocessing: str | Preprocessing = INTERACTIVE_PREPROCESSING,
    ) -> torch.Tensor:
        """Squash each (3, H, W) uint8 image to (3, size, size), normalise, and batch: (B, 3, S, S).

        With the ``exif`` preprocessing (default) the resize is torch's antialiased bicubic. On
        CPU it runs on uint8 pixels (torch's vectorised kernel, about 4x faster; like PIL it
        rounds to whole grey levels, within one level of the float result); elsewhere in
        float32. With ``authors`` it is :meth:`processor_pixels`, on the CPU.
        """
        if get_preprocessing(preprocessing).resize == "pil":
            return self.processor_pixels(images).to(device)
        out = []
        size = (self.size, self.size)
        for image in images:
            if torch.device(device).type == "cpu" and image.dtype == torch.uint8:
                x = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
                x = torch.nn.functional.interpolate(
                    x, size=size, mode="bicubic", antialias=True, align_corners=False
                )  # (1, 3, S, S) uint8
                out.append(x.float().div_(255.0))
                continue
            x = image.to(device=device, dtype=torch.float32).unsqueeze(0) / 255.0  # (1, 3, H, W)
            x = torch.nn.functional.interpolate(
                x, size=size, mode="bicubic", antialias=True, align_corners=False
            )
            out.append(x.clamp_(0.0, 1.0))
        batch = torch.cat(out)  # (B, 3, S, S)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch - mean) / std

    def processor_pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The ``authors`` pixels: (B, 3, S, S) float32 on the CPU, equal bit for bit to the Hugging
        Face image processors' (PIL backend, no centre crop) for the same 8-bit images.

        The processors' own steps and arithmetic: PIL's bicubic resize of the 8-bit image to
        S × S (no reducing gap), the 8-bit result times the rescale factor in float64, cast to
        float32, then ``(x - mean) / std`` in float32.
        """
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        out = []
        for image in images:
            array = image.permute(1, 2, 0).cpu().numpy()  # (H, W, 3) uint8
            resized = Image.fromarray(array, "RGB").resize(
                (self.size, self.size), Image.Resampling.BICUBIC
            )
            scaled = np.asarray(resized).astype(np.float64) * self.rescale_factor  # (S, S, 3)
            x = (scaled.astype(np.float32) - mean) / std  # float32, channels last
            out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
        return torch.stack(out)  # (B, 3, S, S)


@dataclass
class PaddedSquareNormalization:
    """OWLv2's pixels: the checkpoint's own ``Owlv2ImageProcessor`` on the 8-bit image.

    OWLv2 does not squash: its processor pads the image to a square (bottom and right, with the
    processor's fill) and then resizes the square to ``size`` with its own anti-aliased resize.
    J feeds exactly what the processor feeds by calling it, under either named preprocessing
    (they differ only in the EXIF orientation applied when decoding). Boxes of such a model are
    fractions of the *padded* square (see :attr:`pads_to_square`).

    Example:
        >>> from transformers import Owlv2ImageProcessor
        >>> norm = PaddedSquareNormalization(32, Owlv2ImageProcessor(size={"height": 32, "width": 32}))
        >>> norm([torch.zeros(3, 20, 30, dtype=torch.uint8)]).shape  # doctest: +SKIP
        torch.Size([1, 3, 32, 32])
    """

    size: int
    processor: Any
    pads_to_square: bool = True

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike[str], size: int, **kwargs: Any
    ) -> PaddedSquareNormalization:
        """The checkpoint's image processor (its size is the model config's ``image_size``)."""
        from transformers import AutoImageProcessor
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the PIL fallback's notice without torchvision
        try:
            processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(size=size, processor=processor)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.processor.image_mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.processor.image_std)

    def __call__(
        self,
        images: list[torch.Tensor],
        device: torch.device | str = "cpu",
        preprocessing: str | Preprocessing = INTERACTIVE_PREPROCESSING,
    ) -> torch.Tensor:
        """Each (3, H, W) uint8 image through the processor: (B, 3, S, S) float32 on ``device``."""
        get_preprocessing(preprocessing)  # a known name; both use the processor's own resize
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]  # (H, W, 3) uint8
        size = {"height": self.size, "width": self.size}
        out = self.processor(images=arrays, size=size, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out, dtype=torch.float32).to(device)


def owl_normalization(
    source: str | os.PathLike[str], config: Any
) -> ImageNormalization | PaddedSquareNormalization:
    """The pixel preparation of an OWL checkpoint: OWL-ViT squashes
    (:class:`ImageNormalization`), OWLv2 pads to a square (:class:`PaddedSquareNormalization`).

    Example:
        >>> owl_normalization("google/owlv2-base-patch16-ensemble", config)  # doctest: +SKIP
    """
    size = config.vision_config.image_size
    if config.model_type == "owlv2":
        return PaddedSquareNormalization.from_pretrained(source, size)
    return ImageNormalization.from_pretrained(source, size)


def owl_detector_class(config: Any) -> Any:
    """The detector class of an OWL config: ``OwlViTForObjectDetection`` or
    ``Owlv2ForObjectDetection``.

    Raises:
        ValueError: any other ``model_type`` (the message lists the supported ones).

    Example:
        >>> from transformers import Owlv2Config
        >>> owl_detector_class(Owlv2Config()).__name__
        'Owlv2ForObjectDetection'
    """
    import transformers

    model_type = getattr(config, "model_type", None)
    if model_type == "owlv2":
        return transformers.Owlv2ForObjectDetection
    if model_type == "owlvit":
        return transformers.OwlViTForObjectDetection
    raise ValueError(
        f"model_type is {model_type!r}, not one of {', '.join(repr(m) for m in OWL_MODEL_TYPES)}"
    )


def owl_base_model(owl: Any) -> Any:
    """The CLIP-style model inside an OWL detector (``owl.owlvit`` or ``owl.owlv2``), or ``owl``
    itself for a bare ``OwlViTModel`` / ``Owlv2Model``.

    Example:
        >>> owl_base_model(detector).vision_model  # doctest: +SKIP
    """
    for name in ("owlvit", "owlv2"):
        if hasattr(owl, name):
            return getattr(owl, name)
    return owl


def owl_penultimate(owl: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The OWL vision encoder up to its penultimate hidden state: ``t``, (B, 1 + N, D) incl. CLS.

    Runs the embeddings, the pre-layernorm and all encoder layers but the last through the modules'
    own forward methods; equal to ``hidden_states[-2]`` of the full vision model, without computing
    the last layer. ``owl`` is an ``OwlViTForObjectDetection`` or ``Owlv2ForObjectDetection`` (or
    their bare models).
    """
    vision = owl_base_model(owl).vision_model
    dtype = vision.embeddings.patch_embedding.weight.dtype
    hidden = vision.embeddings(pixel_values.to(dtype))  # (B, 1 + N, D)
    hidden = vision.pre_layernorm(hidden)
    for layer in vision.encoder.layers[:-1]:
        hidden = layer(hidden, attention_mask=None)
    return hidden


def llava_image_tokens(llava: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image tokens LLaVA feeds its language model: (B, N, D_llm), through its public API."""
    config = llava.config
    dtype = next(llava.model.vision_tower.parameters()).dtype
    features = llava.model.get_image_features(
        pixel_values=pixel_values.to(dtype),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    tokens = features.pooler_output if hasattr(features, "pooler_output") else features
    return torch.stack(list(tokens)) if isinstance(tokens, (list, tuple)) else tokens


@dataclass
class FeaturePair:
    """Source and target tokens for a batch: ``source`` (B, 1 + N_owl, D_owl) is ``t``,
    ``target`` (B, N, D_llm) the MLLM's own tokens; ``inputs`` (B, N, D_owl) is what W reads
    (``t``'s patches on the MLLM's grids; None: ``t``'s patches themselves)."""

    source: torch.Tensor
    target: torch.Tensor
    inputs: torch.Tensor | None = None

    @property
    def source_patches(self) -> torch.Tensor:
        """What W consumes: the N patch tokens on the MLLM's grids, CLS dropped. (B, N, D_owl)."""
        return self.inputs if self.inputs is not None else self.source[:, 1:]


class FeatureExtractor:
    """Both frozen encoders with their preprocessing: images → (t, the MLLM's vision tokens).

    Args:
        owl: an ``OwlViTForObjectDetection`` or ``Owlv2ForObjectDetection`` (its own
            preprocessing: OWLv2 pads to a square, :class:`PaddedSquareNormalization`).
        mllm: the multi-modal LLM (``LlavaForConditionalGeneration`` or any supported family:
            :mod:`jmllm.align.families`), its language model optional.
        owl_norm, mllm_norm: each model's :class:`ImageNormalization` (the MLLM's at its
            family's square side).
        preprocessing: the resize of :mod:`jmllm.align.preprocessing`, ``"exif"`` (default) or
            ``"authors"`` (the Hugging Face processors' PIL resize; decode the images with
            ``exif_orientation=False`` to match it).

    Example:
        >>> fx = FeatureExtractor.from_pretrained("google/owlvit-base-patch32",
        ...                                       "llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
        >>> pair = fx([image_to_tensor(load_image("cat.jpg"))])  # doctest: +SKIP
        >>> pair.source.shape, pair.target.shape  # doctest: +SKIP
        (torch.Size([1, 577, 768]), torch.Size([1, 576, 4096]))
    """

    def __init__(
        self,
        owl: Any,
        mllm: Any,
        owl_norm: ImageNormalization | PaddedSquareNormalization,
        mllm_norm: ImageNormalization,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> None:
        self.owl = owl.eval().requires_grad_(False)
        self.mllm = mllm.eval().requires_grad_(False)
        self.owl_norm = owl_norm
        self.mllm_norm = mllm_norm
        self.preprocessing = get_preprocessing(preprocessing).name
        self.family: VisionFamily = vision_family(mllm.config)
        vision = owl.config.vision_config
        side = vision.image_size // vision.patch_size
        self.owl_grid = (side, side)

    # LLaVA-era names, kept for callers written before other families
    @property
    def llava(self) -> Any:
        return self.mllm

    @property
    def llava_norm(self) -> ImageNormalization:
        return self.mllm_norm

    @classmethod
    def from_pretrained(
        cls,
        owl: str | os.PathLike[str],
        mllm: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_language_model: bool = False,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> FeatureExtractor:
        """Load both encoders (the MLLM of any supported family).

        Only the MLLM's vision side is needed to train W, so by default its language model is
        never loaded: the model is built with zero decoder layers (the checkpoint's layer
        tensors are skipped, about 13 GB for LLaVA-1.5-7b in bf16) and the embeddings and LM head
        are dropped after loading.
        """
        from transformers import AutoConfig

        prepare_hub([owl, mllm])  # an unreachable Hub: one line, no retries
        with _naming_errors(owl, "OWL-ViT"):
            owl_class = owl_detector_class(AutoConfig.from_pretrained(owl))  # OWL-ViT or OWLv2
            owl_model = owl_class.from_pretrained(owl, dtype=dtype).to(device)
        with _naming_errors(mllm, "multi-modal LLM"):
            mllm_model = _load_mllm(mllm, dtype, load_language_model)
        mllm_model.to(device)
        with _naming_errors(owl, "OWL-ViT image processor"):
            owl_norm = owl_normalization(owl, owl_model.config)
        side = vision_family(mllm_model.config).layout.side
        with _naming_errors(mllm, "image processor"):
            mllm_norm = ImageNormalization.from_pretrained(mllm, side)
        return cls(owl_model, mllm_model, owl_norm, mllm_norm, preprocessing)

    @property
    def device(self) -> torch.device:
        return next(self.owl.parameters()).device

    @torch.no_grad()
    def source(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``t`` for (3, H, W) uint8 images: (B, 1 + N, D_owl)."""
        return owl_penultimate(self.owl, self.owl_norm(images, self.device, self.preprocessing))

    def w_inputs(self, t: torch.Tensor, drop_cls: bool = True) -> torch.Tensor:
        """What W reads of ``t`` (B, 1 + N_owl, D_owl): its patch tokens resampled onto the
        family's grids, (B, N, D_owl); ``t`` itself when W keeps CLS (same grids only)."""
        if not drop_cls:
            return t
        return resample_patches(t[:, 1:], self.owl_grid, self.family.layout)

    @torch.no_grad()
    def target(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The MLLM's own vision tokens for (3, H, W) uint8 images: (B, N, D_llm)."""
        return self.target_from_pixels(self.mllm_norm(images, self.device, self.preprocessing))

    @torch.no_grad()
    def target_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The MLLM's own vision tokens for normalised (B, 3, S, S) squares: (B, N, D_llm)."""
        return self.family.tokens(self.mllm, pixel_values)

    def __call__(self, images: list[torch.Tensor]) -> FeaturePair:
        source = self.source(images)
        with torch.no_grad():
            inputs = self.w_inputs(source)
        return FeaturePair(source=source, target=self.target(images), inputs=inputs)


class ModelLoadError(OSError):
    """A model cannot be loaded from the source given (a wrong path or id: bad input, exit 2)."""

    exit_code = 2


@contextlib.contextmanager
def _naming_errors(source: Any, what: str) -> Iterator[None]:
    """Turn a loading failure deep inside transformers into one line naming the checkpoint."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source}: cannot load {what} ({first})") from None


def _load_mllm(source: Any, dtype: torch.dtype, load_language_model: bool) -> Any:
    """The MLLM (any supported family), by default without its language model (built with 0
    decoder layers, then dropped)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(source)
    vision_family(config)  # an unsupported family is refused before any weight is read
    if load_language_model:
        return AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    config.text_config.num_hidden_layers = 0
    if hasattr(config.text_config, "layer_types"):
        config.text_config.layer_types = []  # Qwen's per-layer attention kinds
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped layers are "unexpected keys" by design
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.model.language_model = torch.nn.Identity()
    model.lm_head = torch.nn.Identity()
    return model
