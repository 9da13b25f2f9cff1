"""The toy models' architectures, tokenizers and processors (real transformers classes, small).

- Toy OWL-ViT: ``OwlViTForObjectDetection``, 128 px input, patch 16 → an 8 × 8 token grid, a
  CLIP-style tokenizer (end-of-text has the largest id: OWL-ViT pools there) trained in-process
  on the toy vocabulary, 16 text positions.
- Toy LLaVA: ``LlavaForConditionalGeneration``: a CLIP vision tower at 112 px, patch 14 → the
  same 8 × 8 grid, vision feature layer −2 with CLS dropped (LLaVA-1.5's ``default`` strategy),
  a GELU projector and a small Llama, with a Llama-style tokenizer (BOS added, ``<image>``
  special) trained in-process on the toy conversations.

The tokenizers follow :mod:`jmllm.align.testing` (``tokenizers`` BPE with a Metaspace
pre-tokenizer, wrapped in ``PreTrainedTokenizerFast``); their corpus is every question and answer
the toy world asks, in both conversation templates, so each toy word is one token.

Example:
    >>> from jmllm.joint.toy.models import ToyDims, toy_owl_tokenizer
    >>> tok = toy_owl_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("a photo of a red circle").input_ids)[1:-1]
    ['▁a', '▁photo', '▁of', '▁a', '▁red', '▁circle']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from jmllm.joint.chat.templates import (
    DEFAULT_EOS,
    LLAVA_TEMPLATES,
    Conversation,
    format_conversation,
)
from jmllm.joint.toy.scenes import (
    COLOURS,
    CONTENT_QUESTION,
    IMAGE_SIZE,
    IN_IMAGE_PREFIX,
    IN_IMAGE_QUESTION,
    NUMBER_WORDS,
    SHAPES,
    YES_NO,
    ToyObject,
    scene_questions,
    with_yes_no,
)

QUERY_TEMPLATE = "a photo of a {}"  # J's default query template (DEFAULT_QUERY_TEMPLATE)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OWL_TEXT_POSITIONS = 16  # as OWL-ViT B/32


@dataclass(frozen=True)
class ToyDims:
    """Sizes of the toy models (the defaults are the shipped recipe's)."""

    # OWL-ViT: 128 px / 16 px patches = 8 × 8 tokens; t is (1 + 64, owl_width)
    owl_image_size: int = IMAGE_SIZE
    owl_patch_size: int = 16
    owl_width: int = 64  # vision hidden size: W's input dimension
    owl_layers: int = 4
    owl_heads: int = 4
    owl_text_width: int = 64  # = projection dim (OWL-ViT's class head needs them equal)
    owl_text_layers: int = 2
    # LLaVA: 112 px / 14 px patches = the same 8 × 8 grid
    llava_image_size: int = 112
    llava_patch_size: int = 14
    llava_vision_width: int = 96
    llava_vision_layers: int = 4  # feature layer -2: the output of layer 3
    llava_vision_heads: int = 4
    llm_width: int = 128  # Llama hidden size: W's output dimension
    llm_layers: int = 3
    llm_heads: int = 4
    llm_positions: int = 256

    @property
    def grid(self) -> int:
        return self.owl_image_size // self.owl_patch_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def query_texts() -> list[str]:
    """Every detection query of the toy world: shapes, then colour-shape names, in the template."""
    names = list(SHAPES) + [f"{c} {s}" for c in COLOURS for s in SHAPES]
    return [QUERY_TEMPLATE.format(n) for n in names]


def conversation_lines(
    templates: tuple[str, ...],
    eos: str = DEFAULT_EOS,
    image: str = "<image>",
    yes_no: Sequence[str] = YES_NO,
) -> list[str]:
    """Every toy question and answer as a one-turn conversation in each of ``templates`` (with
    ``eos`` closing the answer, ``<image>`` written as ``image`` and yes/no answered as
    ``yes_no``): a toy tokenizer's corpus.

    Example:
        >>> conversation_lines(("paper",))[0]
        "<image>\\nUSER: What's the content of the image?\\nASSISTANT: a red circle</s>"
    """
    objs = [ToyObject(s, c, (0, 0, 1, 1)) for c in COLOURS for s in SHAPES]
    lines: list[str] = []
    for i in range(len(objs)):
        group = [objs[i], objs[(i + 5) % len(objs)], objs[(i + 10) % len(objs)]]
        for k in (1, 2, 3):
            for qa in (with_yes_no(q, yes_no) for q in scene_questions(group[:k])):
                for template in templates:
                    conv = Conversation().ask(qa.question).answered(qa.answer)
                    text = format_conversation(conv, eos=eos, template=template)
                    lines.append(text.replace("<image>", image))
    return lines


def vocabulary_lines() -> list[str]:
    """The toy questions' words outside a conversation (so every word is in the corpus in
    every position), after :func:`conversation_lines` in each toy tokenizer's corpus."""
    return [CONTENT_QUESTION, IN_IMAGE_QUESTION, IN_IMAGE_PREFIX, " ".join(NUMBER_WORDS)]


def _conversation_corpus(yes_no: Sequence[str] = YES_NO) -> list[str]:
    """Every toy question and answer, in both templates, plus the words in every position."""
    return conversation_lines(LLAVA_TEMPLATES, yes_no=yes_no) + vocabulary_lines()  # a LLaVA-1.5


def toy_owl_tokenizer() -> Any:
    """A CLIP-style tokenizer for the detection queries (end-of-text has the largest id)."""
    from jmllm.align.testing import tiny_owl_tokenizer

    return tiny_owl_tokenizer(query_texts() * 4, 160, OWL_TEXT_POSITIONS)


def toy_llava_tokenizer(yes_no: Sequence[str] = YES_NO) -> Any:
    """A Llama-style tokenizer (BOS added, ``<image>`` special) for the toy conversations, whose
    yes/no questions are answered ``yes_no`` (the recipe's ``CaptionerRecipe.yes_no``)."""
    from jmllm.align.testing import tiny_llava_tokenizer

    specials = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
    return tiny_llava_tokenizer(_conversation_corpus(yes_no), 256, specials)


# ---------------------------------------------------------------------------------------------
# Models


def new_owl(dims: ToyDims, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised toy ``OwlViTForObjectDetection`` (seeded)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    config = OwlViTConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "hidden_size": dims.owl_text_width,
            "intermediate_size": 2 * dims.owl_text_width,
            "num_hidden_layers": dims.owl_text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": OWL_TEXT_POSITIONS,
        },
        vision_config={
            "image_size": dims.owl_image_size,
            "patch_size": dims.owl_patch_size,
            "hidden_size": dims.owl_width,
            "intermediate_size": 4 * dims.owl_width,
            "num_hidden_layers": dims.owl_layers,
            "num_attention_heads": dims.owl_heads,
        },
        projection_dim=dims.owl_text_width,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = OwlViTForObjectDetection(config)
        _init_detection_heads(model)
    return model


def _init_detection_heads(owl: Any) -> None:
    """Start the detection heads where training can move them.

    transformers initialises OWL-ViT's heads with unit-variance weights (the real model is only
    ever loaded from a checkpoint), which saturates the box sigmoid: every box starts at zero
    size on the border and gets no gradient. Here hidden layers get a 1/sqrt(fan-in) scale, the
    box output starts at zero (every patch predicts its own grid cell, OWL-ViT's box bias), and
    the class logits start low (shift −2, scale 2: p ≈ 0.02), the usual prior for rare positives.
    """
    with torch.no_grad():
        for linear in (owl.box_head.dense0, owl.box_head.dense1, owl.class_head.dense0):
            linear.weight.normal_(0.0, linear.weight.shape[1] ** -0.5)
            linear.bias.zero_()
        owl.box_head.dense2.weight.zero_()
        owl.box_head.dense2.bias.zero_()
        for linear, bias in ((owl.class_head.logit_shift, -2.0), (owl.class_head.logit_scale, 1.0)):
            linear.weight.normal_(0.0, 0.01)
            linear.bias.fill_(bias)


def new_llava(dims: ToyDims, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised toy ``LlavaForConditionalGeneration`` (seeded)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": dims.llava_image_size,
            "patch_size": dims.llava_patch_size,
            "hidden_size": dims.llava_vision_width,
            "intermediate_size": 4 * dims.llava_vision_width,
            "num_hidden_layers": dims.llava_vision_layers,
            "num_attention_heads": dims.llava_vision_heads,
            "projection_dim": dims.llava_vision_width,
            "hidden_act": "quick_gelu",
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": dims.llm_width,
            "intermediate_size": 2 * dims.llm_width,
            "num_hidden_layers": dims.llm_layers,
            "num_attention_heads": dims.llm_heads,
            "num_key_value_heads": dims.llm_heads,
            "max_position_embeddings": dims.llm_positions,
            "rms_norm_eps": 1e-5,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_owl(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` the toy OWL-ViT with its processor (CLIP statistics, no crop)."""
    from transformers import OwlViTImageProcessor, OwlViTProcessor

    size = int(model.config.vision_config.image_size)
    image_processor = OwlViTImageProcessor(
        size={"height": size, "width": size},
        crop_size={"height": size, "width": size},
        do_center_crop=False,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_llava(model: Any, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` the toy LLaVA with its processor (CLIP statistics, squashed, no crop)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = model.config.vision_config
    size = int(vision.image_size)
    image_processor = CLIPImageProcessor(
        size={"height": size, "width": size},
        crop_size={"height": size, "width": size},
        do_center_crop=False,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision.patch_size),
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
