"""The toy Qwen2-VL: a second MLLM family for the toy world (``toy train --family qwen2_vl``).

``Qwen2VLForConditionalGeneration``, small: the vision tower reads the 128 px scene as 8 × 8
patches of 16 px, the token grid of the toy OWL-ViT (spatial merge 1: :class:`QwenDims` says why;
the config's
:data:`jmllm.align.families.TOKEN_GRID_KEY` = 8, so J shows it the scene at 128 px), whose
merger outputs the language model's width; a Qwen2-VL language model with M-RoPE; a ChatML
tokenizer (``<|im_end|>`` ends a turn, ``<|vision_start|>``/``<|image_pad|>``/``<|vision_end|>``)
trained in-process on the toy conversations in the ``qwen2-vl`` template.

The recipe is the toy LLaVA's (:mod:`jmllm.joint.toy.captioner`): the tower (merger included,
Qwen2-VL's analogue of LLaVA's projector) is pre-trained densely, then frozen while the language
model learns the conversations. Nothing here is shipped in the wheel.

Example:
    >>> from jmllm.joint.toy.qwen import QwenDims, new_qwen, toy_qwen_tokenizer
    >>> tok = toy_qwen_tokenizer()
    >>> new_qwen(QwenDims(), tok, 0).config.model_type
    'qwen2_vl'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from jmllm.align.testing_families import QWEN_SPECIALS as _FAMILY_SPECIALS
from jmllm.joint.model.families.qwen2_vl import Qwen2VLAdapter
from jmllm.joint.toy.models import CLIP_MEAN, CLIP_STD
from jmllm.joint.toy.scenes import YES_NO

QWEN_DIR = "qwen2_vl"  # the toy Qwen2-VL's folder in a toy world
QWEN_TEMPLATE = Qwen2VLAdapter.template  # "qwen2-vl": the family's chat format
QWEN_SPECIALS = ("<unk>", *_FAMILY_SPECIALS)  # the tiny Qwen tokenizers' specials, <unk> first


@dataclass(frozen=True)
class QwenDims:
    """Sizes of the toy Qwen2-VL (the defaults are the recipe's)."""

    # 128 px / 16 = the toy OWL-ViT's 8 × 8 grid, one token per patch: a 2 × 2 merge of 8 px
    # patches (Qwen2-VL's own) gives the same grid but costs the tower 4 × the tokens, over 10 ×
    # the time on a CPU (2.5 s a step of 32 scenes), which the recipe's budget does not allow
    patch_size: int = 16
    merge_size: int = 1
    token_grid: int = 8
    vision_width: int = 96
    vision_layers: int = 3  # as the toy LLaVA's tower up to its feature layer (−2 of 4)
    vision_heads: int = 4
    llm_width: int = 128  # W's output dimension
    llm_layers: int = 3
    llm_heads: int = 4  # head_dim 32: M-RoPE sections (4, 6, 6) sum to 16
    llm_positions: int = 512

    @property
    def image_size(self) -> int:
        return self.token_grid * self.patch_size * self.merge_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _qwen_corpus(yes_no: Sequence[str] = YES_NO) -> list[str]:
    """Every toy conversation in the ``qwen2-vl`` template, the image as its three specials."""
    from jmllm.joint.toy.models import conversation_lines, vocabulary_lines

    image = "<|vision_start|><|image_pad|><|vision_end|>"
    lines = conversation_lines((QWEN_TEMPLATE,), eos="<|im_end|>", image=image, yes_no=yes_no)
    return lines + vocabulary_lines()


def toy_qwen_tokenizer(yes_no: Sequence[str] = YES_NO) -> Any:
    """A Qwen-style ChatML tokenizer (no BOS, ``<|im_end|>`` ends a turn) for the toy world
    (yes/no answered ``yes_no``, as :func:`jmllm.joint.toy.models.toy_llava_tokenizer`)."""
    from transformers import PreTrainedTokenizerFast

    from jmllm.align.testing import _train_bpe

    tok = _train_bpe(256, list(QWEN_SPECIALS), _qwen_corpus(yes_no), split_punctuation=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="left",
    )


def new_qwen(dims: QwenDims, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised toy ``Qwen2VLForConditionalGeneration`` (seeded)."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from jmllm.align.families import TOKEN_GRID_KEY

    head_dim = dims.llm_width // dims.llm_heads
    half = head_dim // 2
    sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # Qwen's 16:24:24
    text = {
        "model_type": "qwen2_vl_text",
        "vocab_size": len(tokenizer),
        "hidden_size": dims.llm_width,
        "intermediate_size": 2 * dims.llm_width,
        "num_hidden_layers": dims.llm_layers,
        "num_attention_heads": dims.llm_heads,
        "num_key_value_heads": dims.llm_heads,
        "max_position_embeddings": dims.llm_positions,
        "rms_norm_eps": 1e-6,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": sections,
        },
    }
    vision = {
        "depth": dims.vision_layers,
        "embed_dim": dims.vision_width,
        "hidden_size": dims.llm_width,  # the merger's output: the language model's width
        "num_heads": dims.vision_heads,
        "mlp_ratio": 4,
        "patch_size": dims.patch_size,
        "spatial_merge_size": dims.merge_size,
        "temporal_patch_size": 2,
    }
    config = AutoConfig.for_model(
        "qwen2_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    setattr(config, TOKEN_GRID_KEY, dims.token_grid)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def save_qwen(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` the toy Qwen2-VL with its tokenizer and image processor (CLIP
    statistics, the patch and merge sizes of its tower)."""
    import json
    import tempfile

    from transformers import AutoImageProcessor

    vision = model.config.vision_config
    doc = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "patch_size": int(vision.patch_size),
        "merge_size": int(vision.spatial_merge_size),
        "temporal_patch_size": int(vision.temporal_patch_size),
    }
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:  # the Auto class picks the installed backend
        Path(tmp, "preprocessor_config.json").write_text(json.dumps(doc))
        AutoImageProcessor.from_pretrained(tmp).save_pretrained(folder)
    return folder


__all__ = ["QWEN_DIR", "QwenDims", "new_qwen", "save_qwen", "toy_qwen_tokenizer"]
