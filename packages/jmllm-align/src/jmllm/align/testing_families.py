"""Offline checkpoints of every supported MLLM family: tiny ones, and the published shapes.

Beside :mod:`jmllm.align.testing`'s tiny LLaVA-1.5, this module builds, in-process and without
the Hub, a tiny checkpoint of each family of :mod:`jmllm.align.families` (LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL): the real model classes with small widths, a tokenizer
trained in-process with the family's special tokens, an image processor, saved with
``save_pretrained`` so the ``from_pretrained`` path users take is the one exercised.

It also writes out the published configuration of one real model per family
(:data:`PUBLISHED`, with where each value was read), so that the real shapes can be built with
random weights and a few language-model layers (:func:`published_config`).

Example:
    >>> from jmllm.align.testing_families import build_tiny_family
    >>> folder = build_tiny_family("/tmp/jmllm-tiny", "qwen2_vl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jmllm.align.families import FAMILIES
from jmllm.align.files import atomic_write_text
from jmllm.align.testing import (
    _CORPUS,
    _atomic_dir,
    _train_bpe,
    build_tiny_checkpoints,
    llava_1_5_7b_config,
    require_tokenizers,
    tiny_llava_tokenizer,
)

__all__ = [
    "PUBLISHED",
    "QWEN_SPECIALS",
    "TINY_FAMILIES",
    "PublishedModel",
    "build_tiny_family",
    "key_fields",
    "published_config",
    "published_tokenizer",
    "tiny_family_config",
    "tiny_family_tokenizer",
]

TINY_FAMILY_VERSION = 1  # bump when a tiny family recipe changes, so cached folders are rebuilt
TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

# the special tokens of the Qwen2-VL family's tokenizers (the tiny ones here, the toy Qwen2-VL's)
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# the chat formats' own words, so the tiny tokenizers split them as the real ones would
_CHAT_CORPUS = [
    "[INST] <image>\nWhat's the content of the image? [/INST] The image shows a bird.</s>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>What's in the image?<|im_end|>\n"
    "<|im_start|>assistant\nThe image shows a bird on a branch.<|im_end|>",
    "<|im_start|>user <image>\nIs there a cat in the image?<|im_end|><|im_start|>assistant\nYes",
    "A chat between a curious human and an artificial intelligence assistant.",
]


def tiny_family_tokenizer(family: str) -> Any:
    """A tokenizer for the tiny checkpoint of ``family``, trained in-process.

    LLaVA-1.5 and LLaVA-NeXT: Llama-style (BOS, ``<image>``, ``</s>``). OneVision and Qwen:
    Qwen-style ChatML (no BOS, ``<|im_end|>`` ends a turn; ``<image>`` for OneVision,
    ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen).

    Example:
        >>> tok = tiny_family_tokenizer("qwen2_vl")
        >>> tok.eos_token, tok.bos_token
        ('<|im_end|>', None)
    """
    corpus = (_CORPUS + _CHAT_CORPUS) * 4
    if family in ("llava", "llava_next"):
        return tiny_llava_tokenizer(corpus, vocab_size=360)
    from transformers import PreTrainedTokenizerFast

    require_tokenizers()
    specials = list(QWEN_SPECIALS) + (["<image>"] if family == "llava_onevision" else [])
    tok = _train_bpe(360, ["<unk>", *specials], corpus)
    extra = {"image_token": "<image>"} if family == "llava_onevision" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        padding_side="left",
    )


def _text(model_type: str, vocab: int, pad: int, **extra: Any) -> dict[str, Any]:
    """A 2-layer, 48-wide language model of the given type."""
    return {
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "pad_token_id": pad,
        **extra,
    }


_CLIP = {
    "model_type": "clip_vision_model",
    "image_size": 84,
    "patch_size": 14,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}


def tiny_family_config(family: str, tokenizer: Any) -> Any:
    """The tiny configuration of ``family``, its special-token ids from ``tokenizer``.

    The grids follow the published models' shapes at a small scale: LLaVA-NeXT 6×6 tiles of
    84 px with the published pinpoint shapes (1×2, 2×1, 2×2, 3×1, 1×3 tiles); OneVision 7×7
    SigLIP tiles of 98 px (so OWL-ViT's tiny 6×6 grid is resampled, as B/32's 24×24 is onto
    OneVision's 27×27); Qwen patch 14, 2×2 merge, M-RoPE (the image at 672 px: 24×24 tokens).

    Example:
        >>> tiny_family_config("llava_next", tiny_family_tokenizer("llava_next")).model_type
        'llava_next'
    """
    from transformers import AutoConfig

    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    if family == "llava":
        from jmllm.align.testing import tiny_llava_config

        return tiny_llava_config(vocab, tokenizer.convert_tokens_to_ids("<image>"), pad)
    if family == "llava_next":
        tile = 84
        return AutoConfig.for_model(
            "llava_next",
            vision_config=_CLIP,
            text_config=_text("mistral", vocab, pad, sliding_window=None),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=pad,
            image_grid_pinpoints=[[tile * h, tile * w] for h, w in _NEXT_TILES],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
    if family == "llava_onevision":
        tile = 98
        return AutoConfig.for_model(
            "llava_onevision",
            vision_config={
                "model_type": "siglip_vision_model",
                "image_size": tile,
                "patch_size": 14,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "vision_use_head": False,
            },
            text_config=_text("qwen2", vocab, pad),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=[[tile * h, tile * w] for h in range(1, 4) for w in range(1, 4)],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    # head_dim 12: M-RoPE's temporal/height/width sections must sum to 6
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}
    text = _text(f"{family}_text", vocab, pad, rope_parameters=rope)
    text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    vision: dict[str, Any]
    if family == "qwen2_vl":
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 48,  # the merger's output: the language model's width
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
    elif family == "qwen2_5_vl":
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 48,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        }
    else:
        raise ValueError(f"family {family!r}: no tiny recipe (known: {', '.join(FAMILIES)})")
    return AutoConfig.for_model(family, text_config=text, vision_config=vision, **ids)


_NEXT_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # llava-v1.6's pinpoints, in tiles


def _image_processor(family: str, config: Any) -> Any:
    from transformers import AutoImageProcessor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    if family == "llava_onevision":
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # SigLIP's statistics
    kinds = {
        "llava_next": "LlavaNextImageProcessor",
        "llava_onevision": "LlavaOnevisionImageProcessor",
        "qwen2_vl": "Qwen2VLImageProcessor",
        "qwen2_5_vl": "Qwen2VLImageProcessor",
    }
    kwargs: dict[str, Any] = {"image_mean": list(mean), "image_std": list(std)}
    if family.startswith("qwen"):
        kwargs.update(patch_size=14, merge_size=2, temporal_patch_size=2)
    else:
        side = int(config.vision_config.image_size)
        kwargs.update(
            size={"height": side, "width": side},
            image_grid_pinpoints=config.image_grid_pinpoints,
            do_center_crop=False,
        )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the Auto class picks the installed backend
        doc = {"image_processor_type": kinds[family], **kwargs}
        Path(tmp, "preprocessor_config.json").write_text(json.dumps(doc))
        return AutoImageProcessor.from_pretrained(tmp)


def _save_family(folder: Path, family: str, seed: int) -> None:
    from transformers import AutoModelForImageTextToText

    tokenizer = tiny_family_tokenizer(family)
    config = tiny_family_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    # Random weights give near-uniform logits; a larger scale makes greedy answers vary by image.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _image_processor(family, config).save_pretrained(folder)


def build_tiny_family(root: str | os.PathLike[str], family: str, seed: int = 0) -> Path:
    """Build (or reuse) the tiny checkpoint of ``family`` under ``root``; its folder.

    LLaVA-1.5's is :func:`jmllm.align.testing.build_tiny_checkpoints`' ``llava/``; the others are
    ``root/<family>/``, rebuilt when the recipe or the seed changes.

    Example:
        >>> from transformers import AutoModelForImageTextToText
        >>> folder = build_tiny_family(tmp_path, "llava_next")  # doctest: +SKIP
        >>> AutoModelForImageTextToText.from_pretrained(folder)  # doctest: +SKIP
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: not supported (known: {', '.join(FAMILIES)})")
    root = Path(root)
    if family == "llava":
        return build_tiny_checkpoints(root, seed=seed).llava
    folder = root / family
    stamp = {"version": TINY_FAMILY_VERSION, "seed": seed, "family": family}
    stamp_file = root / f"{family}.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    _atomic_dir(folder, lambda d: _save_family(d, family, seed + 11))
    atomic_write_text(stamp_file, json.dumps(stamp))
    return folder


# ----------------------------------------------------------------------------------------------
# The published configurations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedModel:
    """One real checkpoint per family: its id, its config.json written out, and the sources."""

    family: str
    model_id: str
    config: dict[str, Any]
    sources: tuple[str, ...] = field(default_factory=tuple)


_CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}

PUBLISHED: dict[str, PublishedModel] = {
    "llava_next": PublishedModel(
        "llava_next",
        "llava-hf/llava-v1.6-mistral-7b-hf",
        {
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "image_token_id": 32000,
            "projector_hidden_act": "gelu",
            "text_config": {
                "model_type": "mistral",
                "hidden_size": 4096,  # MistralConfig's default: not written in the file
                "num_hidden_layers": 32,  # idem
                "num_attention_heads": 32,  # idem
                "intermediate_size": 14336,
                "max_position_embeddings": 32768,
                "num_key_value_heads": 8,
                "rms_norm_eps": 1e-05,
                "rope_theta": 1000000.0,
                "sliding_window": None,
                "vocab_size": 32064,
            },
            "tie_word_embeddings": False,
            "use_image_newline_parameter": True,
            "vision_config": _CLIP_L_336,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
        },
        (
            "config.json of llava-hf/llava-v1.6-mistral-7b-hf as copied, with _name_or_path "
            "llava-hf/llava-v1.6-mistral-7b-hf, in huggingface.co/zhenxuan/llava-v1.6-mistral-"
            "7b-awq and huggingface.co/Ayush374/quantised_llava (config.json)",
            "text hidden size, layers and heads: MistralConfig's defaults (the file omits them); "
            "the model card: Mistral-7B-Instruct-v0.2",
        ),
    ),
    "llava_onevision": PublishedModel(
        "llava_onevision",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        {
            "image_grid_pinpoints": [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)],
            "image_token_id": 151646,
            "projector_hidden_act": "gelu",
            "text_config": {
                "model_type": "qwen2",
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-06,
                "rope_theta": 1000000.0,
                "vocab_size": 151936,
                "tie_word_embeddings": True,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 1152,
                "image_size": 384,
                "intermediate_size": 4304,
                "num_attention_heads": 16,
                "num_hidden_layers": 26,
                "patch_size": 14,
                "vision_use_head": False,
            },
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
        (
            "image_grid_pinpoints (384..2304 px, 36 pairs), image_token_index 151646: "
            "huggingface.co/llava-hf/llava-onevision-qwen2-0.5b-ov-hf/blame/.../config.json",
            "SigLIP tower (1152 wide, 26 layers, 4304, 384 px, patch 14): the llava-hf "
            "Qwen-0.5B checkpoints' vision_config (llava-hf/llava-interleave-qwen-0.5b-hf)",
            "language model: Qwen/Qwen2-0.5B-Instruct's shapes (not read from the file)",
        ),
    ),
    "qwen2_vl": PublishedModel(
        "qwen2_vl",
        "Qwen/Qwen2-VL-2B-Instruct",
        {
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "text_config": {
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": 28,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-06,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [16, 24, 24],
                },
                "vocab_size": 151936,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
            "tie_word_embeddings": True,
            "vision_config": {
                "depth": 32,  # Qwen2VLVisionConfig's defaults: the file sets hidden_size only
                "embed_dim": 1280,
                "hidden_size": 1536,
                "mlp_ratio": 4,
                "num_heads": 16,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
        },
        (
            "config.json of Qwen/Qwen2-VL-2B-Instruct as copied in huggingface.co/onnx-community/"
            "Qwen2-VL-2B-Instruct and huggingface.co/lightonai/MonoQwen2-VL-v0.1 "
            "(_name_or_path Qwen/Qwen2-VL-2B-Instruct)",
            "vision depth, embed_dim, heads, mlp_ratio, patch and merge sizes: transformers' "
            "Qwen2VLVisionConfig defaults, which the file leaves in place",
        ),
    ),
    "qwen2_5_vl": PublishedModel(
        "qwen2_5_vl",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        {
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "text_config": {
                "hidden_size": 2048,
                "intermediate_size": 11008,
                "num_hidden_layers": 36,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-06,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [16, 24, 24],
                },
                "vocab_size": 151936,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
            "tie_word_embeddings": True,
            "vision_config": {
                "depth": 32,
                "hidden_act": "silu",
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 2048,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
                "temporal_patch_size": 2,
                "tokens_per_second": 2,
            },
        },
        (
            "config.json of Qwen/Qwen2.5-VL-3B-Instruct as quoted in GitHub sources "
            "(a model-config note with the model print; a JSON-parsing test labelled "
            "'Selected Json config from Qwen2.5VL-3B'); agrees with the Qwen2.5-VL report's "
            "Table 1 (arXiv 2502.13923) on the ViT and LLM widths and depths",
        ),
    ),
}


def published_config(
    family: str, text_layers: int | None = None, vision_layers: int | None = None
) -> Any:
    """The published configuration of ``family``'s real model (:data:`PUBLISHED`), optionally
    with fewer language-model and vision layers (every width kept).

    Example:
        >>> published_config("qwen2_vl", text_layers=2).text_config.num_hidden_layers
        2
    """
    from transformers import AutoConfig

    if family == "llava":
        config = llava_1_5_7b_config()
    else:
        data = json.loads(json.dumps(PUBLISHED[family].config))  # a deep copy
        config = AutoConfig.for_model(family, **data)
    text = config.text_config
    if text_layers is not None:
        text.num_hidden_layers = text_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:text_layers]
    if vision_layers is not None:
        vision = config.vision_config
        if hasattr(vision, "depth"):
            vision.depth = vision_layers
            if hasattr(vision, "fullatt_block_indexes"):
                vision.fullatt_block_indexes = [
                    i for i in vision.fullatt_block_indexes if i < vision_layers
                ] or [vision_layers - 1]
        else:
            vision.num_hidden_layers = vision_layers
    return config


def key_fields(config: Any) -> dict[str, Any]:
    """The fields that decide J's shapes, read from a config (for printing beside
    :data:`PUBLISHED`).

    Example:
        >>> key_fields(published_config("qwen2_vl"))["text.hidden_size"]
        1536
    """
    text, vision = config.text_config, config.vision_config
    out: dict[str, Any] = {
        "model_type": config.model_type,
        "image_token_id": config.image_token_id,
        "text.hidden_size": text.hidden_size,
        "text.intermediate_size": text.intermediate_size,
        "text.num_hidden_layers": text.num_hidden_layers,
        "text.num_attention_heads": text.num_attention_heads,
        "text.num_key_value_heads": text.num_key_value_heads,
        "text.vocab_size": text.vocab_size,
    }
    for name in (
        "image_size",
        "patch_size",
        "hidden_size",
        "embed_dim",
        "out_hidden_size",
        "num_hidden_layers",
        "depth",
        "spatial_merge_size",
    ):
        if hasattr(vision, name):
            out[f"vision.{name}"] = getattr(vision, name)
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints"):
        if hasattr(config, name):
            out[name] = getattr(config, name)
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:
        out["text.mrope_section"] = rope["mrope_section"]
    return out


# the published special tokens of each family's tokenizer, at their published ids
_PUBLISHED_SPECIALS: dict[str, dict[str, int]] = {
    "llava": {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001},
    "llava_next": {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001},
    "llava_onevision": {
        "<unk>": 0,
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<image>": 151646,
    },
    "qwen2_vl": {
        "<unk>": 0,
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    },
}
_PUBLISHED_SPECIALS["qwen2_5_vl"] = _PUBLISHED_SPECIALS["qwen2_vl"]


def published_tokenizer(family: str) -> Any:
    """A word-level tokenizer whose special tokens sit at ``family``'s published ids (image
    token, turn markers, BOS/EOS), so J runs at the published shapes with the published ids:
    the real tokenizers' subwords are not needed to check shapes, positions and speed.

    Example:
        >>> tok = published_tokenizer("qwen2_vl")
        >>> tok.convert_tokens_to_ids("<|image_pad|>"), tok.eos_token
        (151655, '<|im_end|>')
    """
    tk = require_tokenizers()
    from transformers import PreTrainedTokenizerFast

    specials = _PUBLISHED_SPECIALS[family]
    words = sorted({w for text in _CORPUS + _CHAT_CORPUS for w in text.split()})
    vocab = dict(specials)
    for word in words:
        vocab.setdefault(word, len(vocab) + 2)  # small ids, below every special one but <unk>
    tok = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.decoder = tk.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(specials))
    llama = "<s>" in specials
    if llama:
        tok.post_processor = tk.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    extra = {"image_token": "<image>"} if "<image>" in specials else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if llama else None,
        eos_token="</s>" if llama else "<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>" if llama else "<|endoftext|>",
        extra_special_tokens=extra,
        padding_side="left",
    )
