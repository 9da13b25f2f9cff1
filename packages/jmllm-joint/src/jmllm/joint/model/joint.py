"""The joint model J: OWL-ViT + alignment W + a multi-modal LLM fed by one vision embedding ``t``.

Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024, arXiv 2405.14612), §3 and DESIGN §1.2::

    image ─► OWL-ViT vision encoder ─► t (B, 1 + N, D_owl), penultimate hidden state, CLS first
                                        ├─► drop CLS ─► W ─► the MLLM's language model ─► O^MLLM
                                        └─► last layer + heads H ─► O^OWL (boxes, class logits)

The MLLM is LLaVA-1.5 (the paper's) or any family of :mod:`jmllm.joint.model.families` (LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL), picked from its config: the family says how many image
tokens W(t) fills, on which grids (``t``'s patch grid resampled onto them where they differ),
and what extra inputs the language model needs.

Embed once (:meth:`JointModel.embed`), then generate, chat, detect and explain from the same ``t``
— or from a perturbed copy of it. The MLLM's image tokens are replaced through its public
``inputs_embeds`` argument; transformers is neither patched nor vendored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from jmllm.align import (
    AlignmentLayer,
    ImageLoadError,
    ImageNormalization,
    check_fits,
    image_to_tensor,
    load_alignment,
    owl_penultimate,
)
from jmllm.align.families import UnsupportedFamilyError, resample_patches, vision_family
from jmllm.align.hub import prepare_hub
from jmllm.align.images import (
    WORKING_SIDE,
    LoadedImage,
    check_pixels,
    open_image,
    working_size,
)
from jmllm.align.options import check_template
from jmllm.align.preprocessing import INTERACTIVE_PREPROCESSING, get_preprocessing
from jmllm.align.weights import looks_like_repo_id, resolve_alignment_path
from jmllm.joint.chat.templates import (
    INTERACTIVE_TEMPLATE,
    LLAVA_TEMPLATES,
    Conversation,
    ConversationTemplate,
    JointAnswer,
    PromptError,
    authors_reply,
    check_question,
    format_conversation,
    get_template,
)
from jmllm.joint.chat.tokenization import (
    INTERACTIVE_TOKENIZATION,
    TokenizationError,
    check_tokenization,
    llava_tokenizer,
)
from jmllm.joint.detection.heads import Detections, decode_detections, owl_detection_heads
from jmllm.joint.model.families import FamilyAdapter, adapter_for

logger = logging.getLogger(__name__)

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


@dataclass
class JointEmbedding:
    """The shared vision embedding of a batch of images.

    Attributes:
        t: (B, 1 + N, D_owl) OWL-ViT penultimate hidden state, CLS first (577 × 768 for B/32).
        image_sizes: original (width, height) of every image: boxes are in these pixels.
        images: the decoded (3, H, W) uint8 working copies (at most 4096 px on the longest side,
            aspect kept; the stock MLLM's path and rendering); may be empty for an embedding made
            from ``t`` alone.
        preprocessing: the named preprocessing the images were embedded with (``"authors"``,
            ``"exif"``; :mod:`jmllm.align.preprocessing`); stock LLaVA resizes with the same.
            None for an embedding made from ``t`` alone.
    """

    t: torch.Tensor
    image_sizes: list[tuple[int, int]]
    images: list[torch.Tensor] = dataclasses.field(default_factory=list)
    preprocessing: str | None = None

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def with_t(self, t: torch.Tensor) -> JointEmbedding:
        """The same images with another ``t`` (e.g. adversarially perturbed)."""
        if t.shape != self.t.shape:
            raise JointModelError(f"t: shape {tuple(t.shape)} != {tuple(self.t.shape)}")
        return dataclasses.replace(self, t=t)

    def select(self, index: int | Sequence[int]) -> JointEmbedding:
        """A sub-batch (keeps the batch dimension)."""
        indices = [index] if isinstance(index, int) else list(index)
        return JointEmbedding(
            t=self.t[indices],
            image_sizes=[self.image_sizes[i] for i in indices],
            images=[self.images[i] for i in indices] if self.images else [],
            preprocessing=self.preprocessing,
        )

    def pil_image(self, index: int = 0) -> Image.Image:
        """The decoded working copy of image ``index`` as RGB PIL (for rendering; it may be
        smaller than ``image_sizes[index]``: scale boxes with
        :func:`jmllm.align.images.box_scale`)."""
        if not self.images:
            raise JointModelError("embedding: holds no images (made from t alone)")
        return Image.fromarray(self.images[index].permute(1, 2, 0).cpu().numpy(), "RGB")


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


DTYPES = ("float32", "bfloat16", "float16")  # the weights dtypes J is loaded in, by name


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A weights dtype given as a ``torch.dtype`` or by name (``"bfloat16"``); None for the
    default (``None`` or ``"auto"``).

    Raises:
        JointModelError: an unknown name.

    Example:
        >>> as_dtype("bfloat16"), as_dtype("auto")
        (torch.bfloat16, None)
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise JointModelError(f"dtype: {dtype!r} is not auto or one of {', '.join(DTYPES)}")
    return getattr(torch, str(dtype))


def check_local_source(source: str | os.PathLike[str], what: str) -> None:
    """Refuse at once a source that can only be a local path and does not exist (before any Hub
    call: transformers would take it for a repo id and retry the Hub for a while).

    Raises:
        JointModelError: naming the missing path.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source)
    if Path(text).expanduser().exists():
        return
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise JointModelError(
            f"{text}: no such {what} folder (and not a Hugging Face Hub id)"
        ) from None


def _load(what: str, source: Any, loader: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return loader(source, *args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JointModelError(f"{source}: cannot load {what} ({_first_line(exc)})") from None


class _FirstScores:
    """A logits processor that keeps the scores of the first generated token (B, V) and
    changes nothing: ``generate``'s own first-step logits, without keeping every step's."""

    def __init__(self) -> None:
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            self.scores = scores.detach().float().cpu()  # (B, V)
        return scores


class JointModel:
    """J: one OWL-ViT embedding ``t`` feeds an MLLM (through W) and OWL-ViT's detection heads.

    Build it with :meth:`from_pretrained`; the constructor takes already loaded modules.

    Args:
        owl: ``OwlViTForObjectDetection``.
        mllm: the multi-modal LLM: ``LlavaForConditionalGeneration`` or a model of any family
            of :mod:`jmllm.joint.model.families` (:attr:`family` is its adapter).
        alignment: the alignment layer W (trained for the MLLM's family).
        tokenizer: the MLLM's tokenizer. owl_tokenizer: OWL-ViT's (CLIP) tokenizer.
        owl_norm, mllm_norm: each model's pixel normalisation (whole image squashed; the
            MLLM's at its family's square side). ``llava_norm``: the old name of ``mllm_norm``.

    Example:
        >>> model = JointModel.from_pretrained(alignment="w.safetensors")  # doctest: +SKIP
        >>> emb = model.embed(["cat.jpg"])  # doctest: +SKIP
        >>> model.generate(emb, "What's in the image?")[0].text  # doctest: +SKIP
        'The image shows a cat sitting on a couch.'
        >>> model.detect(emb, ["cat", "couch"])[0].names  # doctest: +SKIP
        ['cat', 'couch']
    """

    def __init__(
        self,
        owl: Any,
        mllm: Any,
        alignment: AlignmentLayer | None,
        *,
        tokenizer: Any = None,
        owl_tokenizer: Any = None,
        owl_norm: ImageNormalization | None = None,
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
        self.owl_norm = owl_norm or ImageNormalization(vision.image_size, CLIP_MEAN, CLIP_STD)
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

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        owl: str | os.PathLike[str] = DEFAULT_OWL,
        mllm: str | os.PathLike[str] = DEFAULT_MLLM,
        alignment: str | os.PathLike[str] | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict[str, Any] | None = None,
        llava: str | os.PathLike[str] | None = None,
    ) -> JointModel:
        """Load OWL-ViT, the MLLM and W (each a Hub id or a local folder/file) and check they
        fit.

        The MLLM's family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) is
        read from its config and picks the adapter (:mod:`jmllm.joint.model.families`); any other is
        refused in one line listing the supported ones. Dimensions, and the family W was
        trained for, are checked from the configs and the weights file's metadata *before* the
        large weights are loaded. ``trust_remote_code`` is never used.

        Args:
            owl: OWL-ViT checkpoint (``OwlViTForObjectDetection``).
            mllm: the multi-modal LLM's checkpoint (``AutoModelForImageTextToText``), e.g.
                ``llava-hf/llava-1.5-7b-hf`` or ``Qwen/Qwen2-VL-2B-Instruct``.
            alignment: W weights: ``.safetensors`` file, folder, or Hub repo id (required: the
                paper's W has no public default), trained for ``mllm``'s family.
            dtype: weights dtype (a ``torch.dtype`` or its name, ``"bfloat16"``); default (or
                ``"auto"``) bfloat16 on GPU, float32 on CPU.
            device: where OWL-ViT and W run (and the MLLM, without ``device_map``); default the
                first GPU if any, else the CPU.
            device_map: passed to the MLLM's ``from_pretrained`` (e.g. ``"auto"``) to spread the
                language model over devices.
            llava: the old name of ``mllm`` (keyword only).

        Returns:
            The loaded :class:`JointModel`, all parts in eval mode and frozen.

        Raises:
            JointModelError: a checkpoint cannot be loaded, its family is not supported, or the
                three do not fit (the message names the source and the mismatch).

        Example:
            >>> JointModel.from_pretrained("google/owlvit-base-patch32", "llava-hf/llava-1.5-7b-hf",
            ...                            alignment="runs/w/alignment.safetensors")  # doctest: +SKIP
            >>> JointModel.from_pretrained(mllm="Qwen/Qwen2-VL-2B-Instruct",
            ...                            alignment="w-qwen2-vl.safetensors")  # doctest: +SKIP
        """
        from transformers import (
            AutoConfig,
            AutoModelForImageTextToText,
            AutoTokenizer,
            OwlViTForObjectDetection,
        )

        if llava is not None:
            mllm = llava
        if alignment is None:
            raise JointModelError(
                "alignment: required (a W weights file, folder or Hub id); there is no public "
                "default — train one with jmllm-align, or use jmllm.joint.testing for tiny models"
            )
        # Local paths first, before any Hub call: a missing file is named at once.
        check_local_source(owl, "OWL-ViT")
        check_local_source(mllm, "multi-modal LLM")
        if not looks_like_repo_id(alignment):
            alignment = resolve_alignment_path(alignment)
        prepare_hub([owl, llava, alignment])  # an unreachable Hub: one line, no retries
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = as_dtype(dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        owl_config = _load("OWL-ViT config", owl, AutoConfig.from_pretrained)
        mllm_config = _load("multi-modal LLM config", mllm, AutoConfig.from_pretrained)
        if owl_config.model_type != "owlvit":
            raise JointModelError(f"{owl}: model_type is {owl_config.model_type!r}, not 'owlvit'")
        try:
            family = vision_family(mllm_config)
        except UnsupportedFamilyError as exc:
            raise JointModelError(f"{mllm}: {exc}") from None
        w = load_alignment(alignment, device=device, dtype=dtype)
        try:
            check_compatible(w.config, owl_config, mllm_config)
        except JointModelError as exc:
            raise JointModelError(f"{alignment}: {exc}") from None
        # the small parts first: a missing tokenizer should not cost a 14 GB load
        tokenizer = _load("tokenizer", mllm, AutoTokenizer.from_pretrained)
        tokenizer.padding_side = "left"
        owl_tokenizer = _load("OWL-ViT tokenizer", owl, AutoTokenizer.from_pretrained)
        owl_norm = _load(
            "OWL-ViT image processor",
            owl,
            ImageNormalization.from_pretrained,
            owl_config.vision_config.image_size,
        )
        mllm_norm = _load(
            "image processor", mllm, ImageNormalization.from_pretrained, family.layout.side
        )
        owl_model = _load(
            "OWL-ViT",
            owl,
            OwlViTForObjectDetection.from_pretrained,
            dtype=dtype,
            # eager attention: every order of autograd (GA saliency's JVPs) works through it
            attn_implementation="eager",
        ).to(device)
        mllm_model = _load(
            family.title,
            mllm,
            AutoModelForImageTextToText.from_pretrained,
            dtype=dtype,
            device_map=device_map,
        )
        if device_map is None:
            mllm_model.to(device)
        # "llava" stays the key of the MLLM's source (reports and records read it)
        return cls(
            owl_model,
            mllm_model,
            w,
            tokenizer=tokenizer,
            owl_tokenizer=owl_tokenizer,
            owl_norm=owl_norm,
            mllm_norm=mllm_norm,
            sources={"owl": str(owl), "llava": str(mllm), "alignment": str(alignment)},
        )

    @classmethod
    def detector(
        cls,
        owl: str | os.PathLike[str] = DEFAULT_OWL,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
    ) -> JointModel:
        """OWL-ViT alone, for detection (:meth:`embed`, :meth:`detect`, :meth:`detection_heads`):
        neither LLaVA nor W is loaded, so detecting costs OWL-ViT's memory only.

        Language methods (``generate``, ``chat``, GA) raise :class:`JointModelError`.

        Example:
            >>> det = JointModel.detector("google/owlvit-base-patch32")  # doctest: +SKIP
            >>> det.detect(["street.jpg"], ["car", "bus"])[0].names  # doctest: +SKIP
        """
        from transformers import AutoConfig, AutoTokenizer, OwlViTForObjectDetection

        check_local_source(owl, "OWL-ViT")
        prepare_hub([owl])
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = as_dtype(dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        owl_config = _load("OWL-ViT config", owl, AutoConfig.from_pretrained)
        if owl_config.model_type != "owlvit":
            raise JointModelError(f"{owl}: model_type is {owl_config.model_type!r}, not 'owlvit'")
        owl_tokenizer = _load("OWL-ViT tokenizer", owl, AutoTokenizer.from_pretrained)
        owl_norm = _load(
            "OWL-ViT image processor",
            owl,
            ImageNormalization.from_pretrained,
            owl_config.vision_config.image_size,
        )
        owl_model = _load(
            "OWL-ViT",
            owl,
            OwlViTForObjectDetection.from_pretrained,
            dtype=dtype,
            attn_implementation="eager",
        ).to(device)
        return cls(
            owl_model,
            None,
            None,
            owl_tokenizer=owl_tokenizer,
            owl_norm=owl_norm,
            sources={"owl": str(owl)},
        )

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

    def conversation_template(
        self, template: str | ConversationTemplate = INTERACTIVE_TEMPLATE
    ) -> ConversationTemplate:
        """The conversation template J prompts with for ``template``: itself, except that a J
        of another family than LLaVA-1.5 asked for one of LLaVA-1.5's formats (``llava-1.5``,
        ``paper``, the defaults) uses its family's chat format.

        Raises:
            PromptError: an unknown template name (the message lists the known ones).

        Example:
            >>> model.conversation_template("paper").name  # a Qwen2-VL J  # doctest: +SKIP
            'qwen2-vl'
        """
        form = get_template(template)
        family = self.family
        if family is not None and family.model_type != "llava" and form.name in LLAVA_TEMPLATES:
            return get_template(family.template)
        return form

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

    def input_record(
        self,
        template: str | ConversationTemplate | None = None,
        tokenization: str | None = None,
        preprocessing: str | None = None,
    ) -> dict[str, str | None]:
        """How J read its inputs, for a report: the conversation template, the tokenization,
        the preprocessing and the weights' dtype (None for what the run did not use).

        Example:
            >>> model.input_record("paper", "legacy", "authors")  # doctest: +SKIP
            {'template': 'paper', 'tokenization': 'legacy', 'preprocessing': 'authors', 'dtype': 'float32'}
        """
        return {
            "template": self.conversation_template(template).name if template is not None else None,
            "tokenization": self.effective_tokenization(tokenization) if tokenization else None,
            "preprocessing": get_preprocessing(preprocessing).name if preprocessing else None,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def effective_tokenization(self, tokenization: str = INTERACTIVE_TOKENIZATION) -> str:
        """The tokenization J prompts with for ``tokenization``: itself, except that ``legacy``
        (LLaVA-1.5's ids as the authors had them) is ``checkpoint`` for a J of another family,
        as :meth:`conversation_template` gives such a J its own chat format.

        Example:
            >>> model.effective_tokenization("legacy")  # a Qwen2-VL J  # doctest: +SKIP
            'checkpoint'
        """
        name = check_tokenization(tokenization)
        family = self.family
        if name == "legacy" and family is not None and family.model_type != "llava":
            return "checkpoint"
        return name

    def llava_tokenizer(self, tokenization: str = INTERACTIVE_TOKENIZATION) -> Any:
        """LLaVA's tokenizer under a named tokenization (:mod:`jmllm.joint.chat.tokenization`):
        ``"checkpoint"`` (as loaded) or ``"legacy"`` (the authors' ids; a copy, made once).

        Raises:
            JointModelError: an unknown name, or ``legacy`` for a tokenizer that has none.
        """
        if self.tokenizer is None:
            raise JointModelError("tokenizer: J was built without the MLLM's tokenizer")
        try:
            tokenization = self.effective_tokenization(tokenization)
        except TokenizationError as exc:
            raise JointModelError(str(exc)) from None
        cached = self._tokenizers.get(tokenization)
        if cached is None:
            try:
                cached = llava_tokenizer(self.tokenizer, tokenization)
            except TokenizationError as exc:
                raise JointModelError(str(exc)) from None
            cached.padding_side = "left"
            self._tokenizers[tokenization] = cached
        return cached

    @property
    def max_positions(self) -> int:
        """The MLLM's language model positions (prompt + answer limit)."""
        return int(self._language().config.text_config.max_position_embeddings)

    @property
    def llava_device(self) -> torch.device:
        """:attr:`mllm_device` by its LLaVA-era name."""
        return self.mllm_device

    # ------------------------------------------------------------------ embedding
    def _decode_images(
        self, images: Any, preprocessing: str = INTERACTIVE_PREPROCESSING
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        exif = get_preprocessing(preprocessing).exif_orientation
        if isinstance(images, (str, os.PathLike, Image.Image, LoadedImage)) or (
            isinstance(images, torch.Tensor) and images.dim() == 3
        ):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise JointModelError(
                "images: expected a non-empty list of paths, PIL images, LoadedImage or tensors"
            )
        tensors, sizes = [], []
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                    raise JointModelError(
                        f"image {i}: tensor must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}"
                    )
                size = (int(image.shape[2]), int(image.shape[1]))
                try:
                    check_pixels(size, f"image {i}")
                except ImageLoadError as exc:
                    raise JointModelError(str(exc)) from None
                tensor = image.cpu()
                if working_size(size) != size:  # shrunk once, like a decoded file
                    pil = Image.fromarray(tensor.permute(1, 2, 0).numpy(), "RGB")
                    tensor = image_to_tensor(open_image(pil, exif_orientation=exif).image)
            elif isinstance(image, LoadedImage):  # already decoded under the policy
                size, tensor = image.original_size, image_to_tensor(image.image)
            elif isinstance(image, (str, os.PathLike, Image.Image)):
                try:
                    loaded = open_image(image, exif_orientation=exif)
                except ImageLoadError as exc:
                    raise JointModelError(str(exc)) from None
                size, tensor = loaded.original_size, image_to_tensor(loaded.image)
            else:
                raise JointModelError(f"image {i}: unsupported type {type(image).__name__}")
            sizes.append(size)
            tensors.append(tensor)
        return tensors, sizes

    @torch.no_grad()
    def embed(
        self,
        images: Any,
        batch_size: int = 32,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> JointEmbedding:
        """The shared embedding ``t`` of a batch of images.

        Each image is decoded under the image policy (:func:`jmllm.align.images.open_image`:
        more than 20 000 × 20 000 pixels refused from the header, large JPEGs decoded reduced,
        RGB conversions — alpha on white, 16-bit scaled, CMYK/palette converted), shrunk once to
        at most 4096 px on its longest side, squashed to OWL-ViT's square input and run to the
        penultimate encoder layer. ``image_sizes`` keep the original sizes, so boxes are in
        original pixels; ``images`` hold the working copies.

        Args:
            images: one or a list of paths, PIL images, (3, H, W) uint8 tensors or
                :class:`~jmllm.align.images.LoadedImage` (decoded already, e.g. with a stricter
                pixel limit; its original size and orientation are kept).
            batch_size: images per OWL-ViT forward (bounds memory for long lists).
            preprocessing: ``"exif"`` (default: EXIF orientation applied, torch's resize) or
                ``"authors"`` (the stored pixels and the HF processors' PIL resize, as the
                paper's authors; :mod:`jmllm.align.preprocessing`).

        Returns:
            :class:`JointEmbedding` with ``t`` (B, 1 + N, D_owl) and the original sizes.

        Raises:
            JointModelError: an image cannot be read (the message names it).

        Example:
            >>> emb = model.embed(["cat.jpg", "dog.png"])  # doctest: +SKIP
            >>> emb.t.shape  # doctest: +SKIP
            torch.Size([2, 577, 768])
        """
        if batch_size < 1:
            raise JointModelError(f"batch_size: must be positive, got {batch_size}")
        try:
            preprocessing = get_preprocessing(preprocessing).name
        except ValueError as exc:
            raise JointModelError(str(exc)) from None
        tensors, sizes = self._decode_images(images, preprocessing)
        if self.input_check is not None:
            for i, (tensor, size) in enumerate(zip(tensors, sizes, strict=True)):
                problem = self.input_check(tensor, size)
                if problem:
                    logger.warning("image %d: %s", i, problem)
        chunks = []
        for start in range(0, len(tensors), batch_size):
            batch = tensors[start : start + batch_size]
            pixel_values = self.owl_norm(batch, self.device, preprocessing)  # (b, 3, S, S)
            chunks.append(owl_penultimate(self.owl, pixel_values.to(self.dtype)))  # (b, 1+N, D)
        return JointEmbedding(
            t=torch.cat(chunks), image_sizes=sizes, images=tensors, preprocessing=preprocessing
        )

    def _as_embedding(
        self, emb_or_images: Any, preprocessing: str = INTERACTIVE_PREPROCESSING
    ) -> JointEmbedding:
        if isinstance(emb_or_images, JointEmbedding):
            return emb_or_images
        return self.embed(emb_or_images, preprocessing=preprocessing)

    # ------------------------------------------------------------------ detection
    def encode_queries(
        self, queries: str | Sequence[str], template: str = DEFAULT_QUERY_TEMPLATE
    ) -> torch.Tensor:
        """Text-query embeddings for the class head, cached per (query set, template).

        Each query is put in ``template``, tokenised with OWL-ViT's tokenizer (padded to its
        16 positions, as OWL-ViT's processor does), run through the text model and the text
        projection and L2-normalised, exactly as ``OwlViTModel.forward`` hands them to the
        detection head.

        Args:
            queries: object names, e.g. ``["cat", "dog"]``.
            template: format string with one ``{}``; ``"{}"`` uses the names as they are.

        Returns:
            (Q, D_q) tensor on :attr:`device`.

        Raises:
            PromptError: an empty query, or one longer than OWL-ViT's text positions.

        Example:
            >>> model.encode_queries(["cat", "dog"]).shape  # doctest: +SKIP
            torch.Size([2, 512])
        """
        names = self._check_queries(queries)
        try:
            check_template(template, "query template")
        except ValueError as exc:
            raise PromptError(str(exc)) from None
        key = (tuple(names), template, str(self.device), self.dtype)
        cached = self._query_cache.get(key)
        if cached is not None:
            return cached
        if self.owl_tokenizer is None:
            raise JointModelError("owl_tokenizer: J was built without OWL-ViT's tokenizer")
        texts = [template.format(name) for name in names]
        max_len = int(self.owl.config.text_config.max_position_embeddings)
        for name, text in zip(names, texts, strict=True):
            n = len(self.owl_tokenizer(text).input_ids)
            if n > max_len:
                raise PromptError(
                    f"query {name!r}: {n} tokens, OWL-ViT's text model takes at most {max_len}"
                )
        tokens = self.owl_tokenizer(
            texts, padding="max_length", max_length=max_len, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            out = self.owl.owlvit.get_text_features(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            )
            embeds = out.pooler_output if hasattr(out, "pooler_output") else out  # (Q, D_q)
            embeds = embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True)
        if len(self._query_cache) >= QUERY_CACHE_SIZE:  # drop the oldest query set
            self._query_cache.pop(next(iter(self._query_cache)))
        self._query_cache[key] = embeds
        return embeds

    @staticmethod
    def _check_queries(queries: str | Sequence[str]) -> list[str]:
        if isinstance(queries, str):
            queries = [queries]
        names = list(queries)
        if not names:
            raise PromptError("queries: empty list; give at least one object name")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise PromptError(f"query {i}: empty query")
        return [name.strip() for name in names]

    def detection_heads(
        self, t: torch.Tensor, query_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """O^OWL from ``t``: class logits and boxes, a differentiable pure function of ``t``.

        Args:
            t: (B, 1 + N, D_owl) embedding (CLS first), possibly perturbed or requiring grad.
            query_embeds: (Q, D_q) from :meth:`encode_queries`.

        Returns:
            class_logits (B, N, Q) and boxes (B, N, 4) ``cx, cy, w, h`` in [0, 1] of the
            squashed square.

        Example:
            >>> logits, boxes = model.detection_heads(emb.t, model.encode_queries(["cat"]))  # doctest: +SKIP
        """
        return owl_detection_heads(self.owl, t, query_embeds)

    def detect(
        self,
        emb_or_images: Any,
        queries: str | Sequence[str],
        threshold: float = 0.1,
        nms_iou: float | None = None,
        template: str = DEFAULT_QUERY_TEMPLATE,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
    ) -> list[Detections]:
        """Detections of every image for open-vocabulary ``queries``, in original pixels.

        Args:
            emb_or_images: a :class:`JointEmbedding` (reused) or images for :meth:`embed`.
            queries: object names; each is put in ``template``.
            threshold: minimum sigmoid score.
            nms_iou: per-class NMS IoU threshold; None keeps every box above the threshold.
            template: query template.
            preprocessing: how images (not an embedding) are embedded (see :meth:`embed`).

        Returns:
            One :class:`Detections` per image, highest score first.

        Example:
            >>> dets = model.detect(emb, ["cat", "dog"], threshold=0.2, nms_iou=0.5)  # doctest: +SKIP
            >>> dets[0].to_records()[0]  # doctest: +SKIP
            {'label': 'cat', 'score': 0.71, 'box': [1.5, 55.3, 315.6, 472.2], 'patch': 301}
        """
        emb = self._as_embedding(emb_or_images, preprocessing)
        names = self._check_queries(queries)
        query_embeds = self.encode_queries(names, template)
        with torch.no_grad():
            logits, boxes = self.detection_heads(emb.t.to(self.device), query_embeds)
        return [
            decode_detections(logits[i], boxes[i], emb.image_sizes[i], names, threshold, nms_iou)
            for i in range(len(emb))
        ]

    # ------------------------------------------------------------------ language side
    def image_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """W(t without CLS) on the family's grids: the image tokens J gives the MLLM's language
        model, (B, L, D_llm), packed as the family lays them out.

        ``t``'s patch grid (:attr:`owl_grid`) is resampled onto every grid of the family's
        layout first where they differ (:func:`jmllm.align.families.resample_patches`); for
        LLaVA-1.5 and Qwen with OWL-ViT B/32 they agree and W reads ``t``'s patches as they
        are. Differentiable in ``t``.

        Example:
            >>> model.image_tokens(emb.t).shape  # LLaVA-1.5  # doctest: +SKIP
            torch.Size([1, 576, 4096])
        """
        family = self._family()
        assert self.alignment is not None
        patches = resample_patches(t[:, 1:].to(self.device), self.owl_grid, family.layout)
        return family.pack(self.alignment(patches))  # (B, N, D) -> (B, L, D)

    @torch.no_grad()
    def stock_image_tokens(self, emb: JointEmbedding) -> torch.Tensor:
        """The MLLM's own image tokens (its vision tower and projector on the squashed image, on
        the same grids and packed the same way as :meth:`image_tokens`)."""
        family = self._family()
        if not emb.images:
            raise JointModelError("embedding: the stock MLLM needs the images, not t alone")
        tower_device = next(family.vision.tower(self.mllm).parameters()).device
        # the same resize as OWL-ViT's side of J got (the embedding's preprocessing)
        preprocessing = emb.preprocessing or INTERACTIVE_PREPROCESSING
        pixel_values = self.mllm_norm(emb.images, tower_device, preprocessing)  # (B, 3, S, S)
        return family.pack(family.stock_tokens(pixel_values))

    @torch.no_grad()
    def stock_inputs(self, emb: JointEmbedding) -> dict[str, torch.Tensor]:
        """The stock MLLM's own image inputs for the embedding's images (``pixel_values`` and
        ``image_sizes`` / ``image_grid_thw``, as its processor lays them out), to run the
        model's own forward beside J's (the exactness checks).

        Example:
            >>> ids = model.prompt_inputs("Hi?")["input_ids"]  # doctest: +SKIP
            >>> model.mllm(input_ids=ids, **model.stock_inputs(emb)).logits  # doctest: +SKIP
        """
        family = self._family()
        if not emb.images:
            raise JointModelError("embedding: the stock MLLM needs the images, not t alone")
        tower_device = next(family.vision.tower(self.mllm).parameters()).device
        preprocessing = emb.preprocessing or INTERACTIVE_PREPROCESSING
        return family.vision.model_inputs(self.mllm_norm(emb.images, tower_device, preprocessing))

    def prompt_inputs(
        self,
        prompts: str | Conversation | Sequence[str | Conversation],
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
    ) -> dict[str, torch.Tensor]:
        """Token ids of prompts in a conversation template, left-padded, ``<image>`` expanded.

        A string is one question (``USER: <image>\\n{question} ASSISTANT:`` with the default
        ``llava-1.5`` template, ``<image>\\nUSER: {question}\\nASSISTANT:`` with ``paper``); a
        :class:`~jmllm.joint.chat.Conversation` gives the multi-turn form. Another family than
        LLaVA-1.5 uses its own chat format (:meth:`conversation_template`) and its own image
        text (Qwen: ``<|vision_start|>``, the image pads, ``<|vision_end|>``).

        Args:
            prompts: one prompt or conversation, or a list of them.
            template: ``"llava-1.5"`` (default) or ``"paper"`` (see :mod:`jmllm.joint.chat`),
                or a family's chat format by name.
            tokenization: ``"checkpoint"`` (default: the tokenizer as loaded) or ``"legacy"``
                (the authors' ids: ``▁`` after ``<image>``; :mod:`jmllm.joint.chat.tokenization`).

        Returns:
            ``{"input_ids": (B, L), "attention_mask": (B, L)}`` on the MLLM's input device.

        Raises:
            PromptError: an empty prompt, or one containing ``<image>`` itself.

        Example:
            >>> model.prompt_inputs(["What's in the image?"])["input_ids"].shape  # doctest: +SKIP
            torch.Size([1, 593])
        """
        family = self._family()
        texts = self._prompt_texts(prompts, template)
        tokenizer = self.llava_tokenizer(tokenization)
        image_text = family.image_text(tokenizer)
        expanded = [text.replace("<image>", image_text, 1) for text in texts]
        tokenizer.padding_side = "left"
        batch = tokenizer(expanded, padding=True, return_tensors="pt")
        return {
            "input_ids": batch["input_ids"].to(self.mllm_device),
            "attention_mask": batch["attention_mask"].to(self.mllm_device),
        }

    def _prompt_texts(
        self, prompts: Any, template: str | ConversationTemplate = INTERACTIVE_TEMPLATE
    ) -> list[str]:
        template = self.conversation_template(template)  # an unknown name fails here
        if isinstance(prompts, (str, Conversation)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise PromptError("prompts: expected a non-empty list of prompts or conversations")
        texts = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, Conversation):
                if not prompt.pending:
                    raise PromptError(f"conversation {i}: has no pending question")
                texts.append(format_conversation(prompt, template=template))
            else:
                question = check_question(prompt, f"prompt {i}")
                texts.append(format_conversation(Conversation().ask(question), template=template))
        return texts

    def merge_image_tokens(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """The MLLM's input embeddings with the image placeholders replaced by ``image_tokens``.

        The placeholders are the first N image-token ids of each row (the prompt's). An
        image-token id after them — one the model generated in an answer, which ``generate``
        fed back through the token embedding — keeps its token embedding, so a teacher-forced
        forward over prompt + answer reproduces the generation's logits.

        Args:
            input_ids: (B, L) with at least N image-token ids per row, the prompt's N first.
            image_tokens: (B, N, D_llm), e.g. :meth:`image_tokens` of ``t``.

        Returns:
            (B, L, D_llm) ``inputs_embeds`` for the MLLM's forward or ``generate``;
            differentiable in ``image_tokens``.

        Example:
            >>> ids = model.prompt_inputs("Hi?")["input_ids"]  # doctest: +SKIP
            >>> model.merge_image_tokens(ids, model.image_tokens(emb.t)).shape  # doctest: +SKIP
            torch.Size([1, 590, 4096])
        """
        embed = self._language().get_input_embeddings()
        inputs_embeds = embed(input_ids)  # (B, L, D_llm)
        B, N = image_tokens.shape[:2]
        if input_ids.shape[0] != B:
            raise JointModelError(f"prompts: {input_ids.shape[0]} rows for {B} images")
        mask = self.placeholders(input_ids, N)
        image_tokens = image_tokens.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_tokens)

    def placeholders(self, input_ids: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """(B, L) bool: the image placeholders of ``input_ids``, the first ``num_tokens``
        (default :attr:`num_image_tokens`) image-token ids of each row.

        Raises:
            JointModelError: a row holds fewer image-token ids.
        """
        N = self.num_image_tokens if num_tokens is None else num_tokens
        mask = input_ids == self._family().image_token_id  # (B, L)
        counts = mask.sum(-1)
        checkable = input_ids.device.type != "meta"  # meta tensors (size checks) hold no ids
        if checkable and bool((counts < N).any()):
            raise JointModelError(
                f"prompts: {counts.tolist()} image tokens per row for images of {N} tokens"
            )
        return mask & (mask.cumsum(-1) <= N)  # the placeholders: the first N per row

    def logits_from_image_tokens(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MLLM's logits (B, L, V) for ``input_ids`` with its image tokens replaced; the
        family adds its extra inputs (positions under left padding; Qwen's M-RoPE)."""
        inputs_embeds = self.merge_image_tokens(input_ids, image_tokens)
        placeholders = self.placeholders(input_ids, image_tokens.shape[1])
        extra = self._family().forward_inputs(input_ids, attention_mask, placeholders)
        out = self.mllm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **extra
        )
        return out.logits

    def language_logits(
        self,
        t: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """J's language-model logits (B, L, V) for ``input_ids``, differentiable in ``t``.

        Args:
            t: (B, 1 + N, D_owl) embedding.
            input_ids: (B, L) ids from :meth:`prompt_inputs` (optionally with answer tokens
                appended), with N image tokens per row.
            attention_mask: (B, L), 0 on left padding.

        Example:
            >>> ids = model.prompt_inputs(["What's in the image?"])  # doctest: +SKIP
            >>> model.language_logits(emb.t, **ids).shape  # doctest: +SKIP
            torch.Size([1, 593, 32064])
        """
        return self.logits_from_image_tokens(self.image_tokens(t), input_ids, attention_mask)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        emb_or_images: Any,
        prompts: str | Conversation | Sequence[str | Conversation],
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        vision: Vision = "joint",
        template: str | ConversationTemplate = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
        preprocessing: str = INTERACTIVE_PREPROCESSING,
        first_token_logits: bool = False,
    ) -> list[JointAnswer]:
        """Answers for a batch of (image, prompt) pairs, with the KV cache.

        The pairs run as one batch: prompts left-padded, positions counted over real tokens,
        one ``generate``; greedy answers are those of the pairs asked one at a time (tested).

        Args:
            emb_or_images: a :class:`JointEmbedding` or images for :meth:`embed`.
            prompts: one per image (a single prompt is used for every image; a single image is
                used for every prompt); strings or :class:`~jmllm.joint.chat.Conversation`.
            max_new_tokens: answer length limit.
            do_sample: sample (with ``temperature`` and ``top_p``) instead of greedy decoding.
            seed: seeds sampling without touching the global random state.
            vision: ``"joint"`` feeds W(t); ``"llava"`` (or ``"stock"``) feeds the MLLM's own
                vision tower and projector on the same (squashed) images, for side-by-side
                comparison.
            template: conversation template, ``"llava-1.5"`` (default) or ``"paper"``; another
                family than LLaVA-1.5 uses its own chat format for these
                (:meth:`conversation_template`).
            tokenization: how the prompts are tokenised, ``"checkpoint"`` (default) or
                ``"legacy"`` (the authors' ids; see :meth:`prompt_inputs`).
            preprocessing: how images (not an embedding) are embedded, ``"exif"`` (default) or
                ``"authors"`` (see :meth:`embed`).
            first_token_logits: also keep each answer's first-token logits, (V,) float32 on the
                CPU, in :attr:`JointAnswer.first_logits` (as ``generate`` scores them: after
                the generation config's logits processors, before sampling).

        Returns:
            One :class:`JointAnswer` per pair.

        Example:
            >>> answers = model.generate(emb, "What's the content of the image?")  # doctest: +SKIP
            >>> stock = model.generate(emb, "What's the content of the image?", vision="llava")  # doctest: +SKIP
        """
        family = self._family()
        if vision not in ("joint", "llava", "stock"):
            raise JointModelError(f"vision: {vision!r} is not 'joint', 'llava' or 'stock'")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise JointModelError(
                f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}"
            )
        emb = self._as_embedding(emb_or_images, preprocessing)
        texts_in = [prompts] if isinstance(prompts, (str, Conversation)) else list(prompts)
        if len(texts_in) == 1 and len(emb) > 1:
            texts_in = texts_in * len(emb)
        if len(emb) == 1 and len(texts_in) > 1:
            emb = emb.select([0] * len(texts_in))
        if len(texts_in) != len(emb):
            raise JointModelError(f"prompts: {len(texts_in)} prompts for {len(emb)} images")
        inputs = self.prompt_inputs(texts_in, template, tokenization)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        limit = self.max_positions
        if input_ids.shape[1] + max_new_tokens > limit:
            raise PromptError(
                f"prompts: {input_ids.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed "
                f"the MLLM's {limit} positions"
            )
        with torch.no_grad():
            if vision == "joint":
                image_tokens = self.image_tokens(emb.t)
            else:
                image_tokens = self.stock_image_tokens(emb)
            inputs_embeds = self.merge_image_tokens(input_ids, image_tokens)
            eos = self.tokenizer.eos_token_id
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "do_sample": do_sample,
                "eos_token_id": eos,
                "pad_token_id": pad,
                "use_cache": True,
            }
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            placeholders = self.placeholders(input_ids, image_tokens.shape[1])
            kwargs.update(family.generate_inputs(input_ids, attention_mask, placeholders))
            first = _FirstScores()
            if first_token_logits:
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList([first])
            with torch.random.fork_rng(devices=self._cuda_devices(), enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                sequences = self.mllm.generate(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
                )
            if family.generate_with_ids:  # the prompt's ids come back first
                sequences = sequences[:, input_ids.shape[1] :]
        texts = self._prompt_texts(texts_in, template)
        answers = [
            self.decode_answer(
                sequences[row],
                input_ids[row][attention_mask[row].bool()],
                texts[row],
                vision,
                self.conversation_template(template).name,
                self.effective_tokenization(tokenization),
            )
            for row in range(sequences.shape[0])
        ]
        if first.scores is not None:
            for row, answer in enumerate(answers):
                answer.first_logits = first.scores[row]
        return answers

    def decode_answer(
        self,
        new_ids: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt: str,
        vision: str = "joint",
        template: str = INTERACTIVE_TEMPLATE,
        tokenization: str = INTERACTIVE_TOKENIZATION,
    ) -> JointAnswer:
        """The :class:`JointAnswer` of generated ids: cut at the first end-of-sequence token
        (anything after it is padding), decoded without special tokens and stripped; its
        ``reply`` is the answer as the authors' scripts read it (decoded with the prompt,
        :func:`~jmllm.joint.chat.authors_reply`).

        Args:
            new_ids: (T,) the generated ids, answer only.
            prompt_ids: (P,) the prompt's ids, image tokens expanded, no padding.
            prompt: the prompt text.
            vision: ``"joint"``, ``"llava"`` or ``"stock"``.
            template: the name of the conversation template the prompt was put in.
            tokenization: the name of the tokenization the prompt was tokenised with.

        Example:
            >>> model.decode_answer(torch.tensor([7, 2, 0]), ids, "Hi?").token_ids  # doctest: +SKIP
            tensor([7])
        """
        new = new_ids.cpu()
        finished = False
        stop = (new == self.tokenizer.eos_token_id).nonzero()
        if stop.numel():
            new, finished = new[: int(stop[0])], True
        prompt_ids = prompt_ids.cpu()
        # as the authors' scripts decode: special tokens skipped, spaces not cleaned up; the
        # image placeholders (special, skipped anyway) are dropped first: 576 fewer to decode
        raw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        text_ids = prompt_ids[prompt_ids != self.llava.config.image_token_id]
        reply = authors_reply(
            self.tokenizer.decode(text_ids, **raw),
            self.tokenizer.decode(torch.cat([text_ids, new]), **raw),
        )
        return JointAnswer(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            token_ids=new,
            prompt_ids=prompt_ids,
            prompt=prompt,
            finished=finished,
            vision=vision,
            template=template,
            tokenization=tokenization,
            reply=reply,
        )

    def _cuda_devices(self) -> list[int]:
        devices = {p.device.index for p in self.mllm.parameters() if p.device.type == "cuda"}
        return sorted(d for d in devices if d is not None)

    def chat(
        self,
        emb_or_image: Any,
        questions: str | Sequence[str],
        history: Conversation | None = None,
        **generate_kwargs: Any,
    ) -> Conversation:
        """Multi-turn chat about one image: answer ``questions`` in order, each with the history.

        Args:
            emb_or_image: one image or a one-image :class:`JointEmbedding`.
            questions: the next question, or several scripted turns.
            history: a previous :class:`~jmllm.joint.chat.Conversation` to continue.
            **generate_kwargs: passed to :meth:`generate` (``max_new_tokens``, ``vision``, …).

        Returns:
            The conversation with the new turns answered; each turn's ``result`` holds its
            :class:`JointAnswer`.

        Example:
            >>> conv = model.chat(emb, ["What's in the image?", "What colour is it?"])  # doctest: +SKIP
            >>> [turn.answer for turn in conv.turns]  # doctest: +SKIP
        """
        preprocessing = generate_kwargs.get("preprocessing", INTERACTIVE_PREPROCESSING)
        emb = self._as_embedding(emb_or_image, preprocessing)
        if len(emb) != 1:
            raise JointModelError(f"chat: one image at a time, got {len(emb)}")
        conversation = history or Conversation()
        for question in [questions] if isinstance(questions, str) else list(questions):
            conversation = conversation.ask(question)
            answer = self.generate(emb, [conversation], **generate_kwargs)[0]
            conversation = conversation.answered(answer.text, answer)
        return conversation
