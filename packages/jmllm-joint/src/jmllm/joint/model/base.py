"""What every part of J shares: its defaults, :class:`JointModelError`, the check that W, OWL-ViT
and the MLLM fit, and :class:`JointBase` (the constructor and the accessors each mixin reads).

:class:`~jmllm.joint.model.joint.JointModel` is :class:`JointBase` with loading
(:mod:`jmllm.joint.model.loading`), the embedding path (:mod:`jmllm.joint.model.embedding`) and
prompts and generation (:mod:`jmllm.joint.model.generation`) mixed in; they all build on this
module, which imports none of them.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from PIL import Image

from jmllm.align import AlignmentLayer, ImageNormalization, check_fits
from jmllm.align.features import PaddedSquareNormalization
from jmllm.align.images import WORKING_SIDE
from jmllm.joint.model.families import FamilyAdapter, adapter_for

DEFAULT_OWL = "google/owlvit-base-patch32"
DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
DEFAULT_MLLM = DEFAULT_LLAVA  # the paper's MLLM
DEFAULT_QUERY_TEMPLATE = "a photo of a {}"
# Images are shrunk (aspect kept) to this longest side before squashing (the image policy of
# jmllm.align.images): both models see at most 768 px.
MAX_IMAGE_SIDE = WORKING_SIDE
# Both OWL-ViT's and LLaVA-1.5's processors use CLIP's statistics (the default without processors).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QUERY_CACHE_SIZE = 256  # query sets whose text embeddings are kept

ImageInput = str | os.PathLike[str] | Image.Image | torch.Tensor
Vision = Literal["joint", "llava", "stock"]  # "llava" and "stock": the MLLM's own vision


class JointModelError(ValueError):
    """J cannot be built or used with these inputs; the message names the input and the problem."""


def check_compatible(alignment_config: Any, owl_config: Any, mllm_config: Any) -> None:
    """Raise :class:`JointModelError` naming the mismatch if W, OWL-ViT and the MLLM do not fit
    (an unsupported MLLM family, a W trained for another family, a dimension).

    Example:
        >>> from jmllm.align import alignment_config_for
        >>> from jmllm.align.testing import llava_1_5_7b_config, owlvit_b32_config
        >>> owl, llava = owlvit_b32_config(), llava_1_5_7b_config()
        >>> check_compatible(alignment_config_for(owl, llava), owl, llava)  # passes silently
    """
    model_type = getattr(mllm_config, "model_type", "")
    strategy = getattr(mllm_config, "vision_feature_select_strategy", "default")
    if model_type == "llava" and strategy != "default":
        raise JointModelError(
            f"LLaVA vision_feature_select_strategy is {strategy!r}; J replaces the CLS-free "
            "'default' image tokens only"
        )
    try:
        check_fits(alignment_config, owl_config, mllm_config)
    except ValueError as exc:
        raise JointModelError(str(exc)) from None


def _default_owl_norm(config: Any) -> ImageNormalization | PaddedSquareNormalization:
    """The OWL side's pixels without its checkpoint's processor: CLIP's statistics, squashed
    (OWL-ViT) or OWLv2's stock processor at the config's size (padded to a square)."""
    size = config.vision_config.image_size
    if getattr(config, "model_type", "owlvit") == "owlv2":
        from transformers import Owlv2ImageProcessor

        processor = Owlv2ImageProcessor(size={"height": size, "width": size})
        return PaddedSquareNormalization(size, processor)
    return ImageNormalization(size, CLIP_MEAN, CLIP_STD)


class JointBase:
    """J's loaded parts and the state every mixin of
    :class:`~jmllm.joint.model.joint.JointModel` reads (built by its constructor)."""

    def __init__(
        self,
        owl: Any,
        mllm: Any,
        alignment: AlignmentLayer | None,
        *,
        tokenizer: Any = None,
        owl_tokenizer: Any = None,
        owl_norm: ImageNormalization | PaddedSquareNormalization | None = None,
        mllm_norm: ImageNormalization | None = None,
        llava_norm: ImageNormalization | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        if (mllm is None) != (alignment is None):
            raise JointModelError("mllm and alignment: give both (J) or neither (detection only)")
        if mllm is not None and alignment is not None:
            check_compatible(alignment.config, owl.config, mllm.config)
        self.owl = owl.eval().requires_grad_(False)
        # None for a detector (OWL-ViT alone); language methods check with _language()
        self.mllm: Any = mllm.eval().requires_grad_(False) if mllm is not None else None
        self.family: FamilyAdapter | None = adapter_for(mllm) if mllm is not None else None
        self.alignment: Any = (
            alignment.eval().requires_grad_(False) if alignment is not None else None
        )
        self.tokenizer = tokenizer
        self.owl_tokenizer = owl_tokenizer
        vision = owl.config.vision_config
        self.owl_norm: ImageNormalization | PaddedSquareNormalization = (
            owl_norm or _default_owl_norm(owl.config)
        )
        # the vision side's patch grid: t's, which the family's grids are resampled from
        self.owl_grid = (vision.image_size // vision.patch_size,) * 2
        side = self.family.layout.side if self.family is not None else vision.image_size
        self.mllm_norm = mllm_norm or llava_norm or ImageNormalization(side, CLIP_MEAN, CLIP_STD)
        self.sources = dict(sources or {})
        # image tokens per prompt (the family's, packed); OWL-ViT's patches for a detector
        self.num_image_tokens = (
            self.family.num_tokens if self.family is not None else self.owl_grid[0] ** 2
        )
        self._query_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._tokenizers: dict[str, Any] = {}  # LLaVA's tokenizer per tokenization name
        # Optional check of every embedded image: (uint8 (3, H, W) working copy, original
        # (width, height)) -> None, or why the image does not suit these models (logged as a
        # warning). The toy world sets it (jmllm.joint.toy.inputs): a photo is not a toy scene.
        self.input_check: Any = None
        # Optional check of answers: (J, its JointEmbedding, one answer text per image) -> for
        # each, None or why the answer may not be trusted (shown by the CLI and the explorer).
        # The toy world sets it (jmllm.joint.toy.inputs): the answer and the detector disagree.
        self.answer_check: Any = None

    # LLaVA-era names, kept for callers written before other families
    @property
    def llava(self) -> Any:
        """The MLLM (:attr:`mllm`), by its LLaVA-era name."""
        return self.mllm

    @property
    def llava_norm(self) -> ImageNormalization:
        """The MLLM's pixel normalisation (:attr:`mllm_norm`), by its LLaVA-era name."""
        return self.mllm_norm

    @property
    def has_language(self) -> bool:
        """Whether the MLLM and W are loaded (False for :meth:`detector`)."""
        return self.mllm is not None

    def _language(self) -> Any:
        if self.mllm is None or self.alignment is None:
            raise JointModelError(
                "J was loaded for detection only (OWL-ViT): load the MLLM and W with "
                "JointModel.from_pretrained to generate, chat or explain"
            )
        return self.mllm

    def _family(self) -> FamilyAdapter:
        self._language()
        assert self.family is not None
        return self.family

    # ------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        """Where OWL-ViT, W and ``t`` live."""
        return next(self.owl.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.owl.parameters()).dtype

    @property
    def mllm_device(self) -> torch.device:
        """Where the MLLM's inputs go (its token embedding's device, also under
        ``device_map``)."""
        return self._language().get_input_embeddings().weight.device

    @property
    def llava_device(self) -> torch.device:
        """:attr:`mllm_device` by its LLaVA-era name."""
        return self.mllm_device
