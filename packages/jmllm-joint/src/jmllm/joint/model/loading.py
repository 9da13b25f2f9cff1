"""Loading J: OWL-ViT, the MLLM and W from the Hub or local folders, checked before the large
weights are read.

The sources and dtype helpers (:func:`check_local_source`, :func:`as_dtype`) and
:class:`LoadingMixin`, which gives :class:`~jmllm.joint.model.joint.JointModel` its
:meth:`~LoadingMixin.from_pretrained` and :meth:`~LoadingMixin.detector`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from jmllm.align import ImageNormalization, load_alignment
from jmllm.align.families import UnsupportedFamilyError, vision_family
from jmllm.align.features import OWL_MODEL_TYPES, owl_detector_class, owl_normalization
from jmllm.align.hub import prepare_hub
from jmllm.align.weights import looks_like_repo_id, resolve_alignment_path
from jmllm.joint.model.base import (
    DEFAULT_MLLM,
    DEFAULT_OWL,
    JointBase,
    JointModelError,
    check_compatible,
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_owl_config(source: Any, config: Any) -> Any:
    """The detector class of an OWL checkpoint's config (OWL-ViT or OWLv2, from its
    ``model_type``); any other is refused in one line naming the source.

    Example:
        >>> from transformers import Owlv2Config
        >>> check_owl_config("owl", Owlv2Config()).__name__
        'Owlv2ForObjectDetection'
    """
    try:
        return owl_detector_class(config)
    except ValueError:
        known = " or ".join(repr(m) for m in OWL_MODEL_TYPES)
        raise JointModelError(
            f"{source}: model_type is {getattr(config, 'model_type', None)!r}, not {known}"
        ) from None


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


_J = TypeVar("_J", bound="LoadingMixin")


class LoadingMixin(JointBase):
    """Builds J from checkpoints: :meth:`from_pretrained` (OWL-ViT, the MLLM and W) and
    :meth:`detector` (OWL-ViT alone)."""

    @classmethod
    def from_pretrained(
        cls: type[_J],
        owl: str | os.PathLike[str] = DEFAULT_OWL,
        mllm: str | os.PathLike[str] = DEFAULT_MLLM,
        alignment: str | os.PathLike[str] | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict[str, Any] | None = None,
        llava: str | os.PathLike[str] | None = None,
    ) -> _J:
        """Load OWL-ViT, the MLLM and W (each a Hub id or a local folder/file) and check they
        fit.

        The MLLM's family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) is
        read from its config and picks the adapter (:mod:`jmllm.joint.model.families`); any other is
        refused in one line listing the supported ones. Dimensions, and the family W was
        trained for, are checked from the configs and the weights file's metadata *before* the
        large weights are loaded. ``trust_remote_code`` is never used.

        Args:
            owl: OWL-ViT checkpoint (``OwlViTForObjectDetection``) or OWLv2 checkpoint
                (``Owlv2ForObjectDetection``, e.g. ``google/owlv2-base-patch16-ensemble``),
                picked from its config's ``model_type``; OWLv2's images are padded to a
                square by its own image processor.
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
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

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
        owl_class = check_owl_config(owl, owl_config)  # OWL-ViT or OWLv2, by model_type
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
        owl_norm = _load("OWL-ViT image processor", owl, owl_normalization, owl_config)
        mllm_norm = _load(
            "image processor", mllm, ImageNormalization.from_pretrained, family.layout.side
        )
        owl_model = _load(
            "OWL-ViT",
            owl,
            owl_class.from_pretrained,
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
        cls: type[_J],
        owl: str | os.PathLike[str] = DEFAULT_OWL,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
    ) -> _J:
        """OWL-ViT alone, for detection (:meth:`embed`, :meth:`detect`, :meth:`detection_heads`):
        neither LLaVA nor W is loaded, so detecting costs OWL-ViT's memory only.

        Language methods (``generate``, ``chat``, GA) raise :class:`JointModelError`.

        Example:
            >>> det = JointModel.detector("google/owlvit-base-patch32")  # doctest: +SKIP
            >>> det.detect(["street.jpg"], ["car", "bus"])[0].names  # doctest: +SKIP
        """
        from transformers import AutoConfig, AutoTokenizer

        check_local_source(owl, "OWL-ViT")
        prepare_hub([owl])
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = as_dtype(dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        owl_config = _load("OWL-ViT config", owl, AutoConfig.from_pretrained)
        owl_class = check_owl_config(owl, owl_config)  # OWL-ViT or OWLv2, by model_type
        owl_tokenizer = _load("OWL-ViT tokenizer", owl, AutoTokenizer.from_pretrained)
        owl_norm = _load("OWL-ViT image processor", owl, owl_normalization, owl_config)
        owl_model = _load(
            "OWL-ViT",
            owl,
            owl_class.from_pretrained,
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
