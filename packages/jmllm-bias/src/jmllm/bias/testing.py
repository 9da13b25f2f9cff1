"""Tiny offline models for tests, the CLI's ``--tiny`` and demos (DESIGN §4): never the Hub.

:func:`build_tiny_sdxl` builds a random-weight SDXL base and refiner with the real architectures
(``UNet2DConditionModel`` with ``addition_embed_type="text_time"``, ``AutoencoderKL``, the two CLIP
text encoders, ``EulerDiscreteScheduler``) and a byte-level CLIP tokenizer made locally, saves them
with ``save_pretrained`` and returns the folders, so tests load them through the same
``from_pretrained`` path users take with ``stabilityai/stable-diffusion-xl-base-1.0``.

The tiny refiner mirrors the real one: only the second text encoder, aesthetic-score time ids
(``requires_aesthetics_score=True``, 5 time ids instead of 6), a UNet conditioned on that encoder
alone.

:func:`tiny_joint_model` is the tiny joint model J from :mod:`jmllm.joint.testing`.

Example:
    >>> from jmllm.bias.testing import build_tiny_sdxl
    >>> sdxl = build_tiny_sdxl("/tmp/tiny-sdxl")  # doctest: +SKIP
    >>> sdxl.base, sdxl.refiner  # folders for StableDiffusionXL(Img2Img)Pipeline.from_pretrained  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jmllm.align.files import atomic_write_text

__all__ = ["TinySDXL", "build_tiny_sdxl", "tiny_clip_tokenizer", "tiny_joint_model"]

TINY_SDXL_VERSION = 1  # bump when the recipe changes, so cached folders are rebuilt
TINY_IMAGE_SIZE = 64  # pixels; the UNet sample size times the VAE's scale factor

_TEXT_HIDDEN = (16, 32)  # hidden sizes of text encoder 1 and 2 (real: 768, 1280)
_TIME_EMBED = 8  # addition_time_embed_dim (real: 256)
# (left, right) pairs in merge order; "</w>" marks a word's last character
_MERGES = ["t h", "h e", "he a", "hea d", "o t</w>", "a n</w>", "m an</w>", "o f</w>", "i n</w>"]


def tiny_clip_tokenizer() -> Any:
    """A CLIP tokenizer with a byte-level character vocabulary (every byte, plain and ``</w>``).

    Any text tokenizes (no unknown tokens); a few merges exercise the BPE path.

    Example:
        >>> tok = tiny_clip_tokenizer()
        >>> tok("A headshot").input_ids[0] == tok.bos_token_id
        True
    """
    from jmllm.align.testing import require_tokenizers

    ByteLevel = require_tokenizers("jmllm-bias[testing]").pre_tokenizers.ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for merge in _MERGES:
        left, right = merge.split(" ")
        vocab.setdefault(left + right, len(vocab))
        merges.append((left, right))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(vocab_size: int, hidden: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,  # not the legacy id 2: pooling then looks for the real end token
        pad_token_id=1,
        hidden_act="gelu",
    )


def _unet(cross_attention_dim: int, time_ids: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        # pooled text embedding of encoder 2 plus one Fourier embedding per time id
        projection_class_embeddings_input_dim=_TEXT_HIDDEN[1] + time_ids * _TIME_EMBED,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),  # three blocks: latents are 4x smaller than the image
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
    )


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # SDXL's own scheduler settings
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _save_base_and_refiner(root: Path, seed: int) -> None:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), _TEXT_HIDDEN[0])).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), _TEXT_HIDDEN[1]))
    vae = _vae()
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        # base UNet attends to both encoders' hidden states, concatenated (real: 768 + 1280)
        unet=_unet(cross_attention_dim=sum(_TEXT_HIDDEN), time_ids=6),
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    base.save_pretrained(root / "base", safe_serialization=True)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        # refiner UNet sees encoder 2 only; time ids carry an aesthetic score instead of a size
        unet=_unet(cross_attention_dim=_TEXT_HIDDEN[1], time_ids=5),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    refiner.save_pretrained(root / "refiner", safe_serialization=True)


@dataclass(frozen=True)
class TinySDXL:
    """Folders of a tiny SDXL base and refiner, each loadable with ``from_pretrained``."""

    root: Path
    base: Path
    refiner: Path
    image_size: int = TINY_IMAGE_SIZE


def build_tiny_sdxl(root: str | os.PathLike[str], seed: int = 0) -> TinySDXL:
    """Build (or reuse, when already built with this recipe) a tiny SDXL base and refiner.

    Args:
        root: folder to hold ``base/`` and ``refiner/``; reused when its stamp matches.
        seed: seed of the random weights.

    Returns:
        The folders, ready for ``StableDiffusionXLPipeline.from_pretrained`` and
        ``StableDiffusionXLImg2ImgPipeline.from_pretrained``.

    Example:
        >>> sdxl = build_tiny_sdxl(tmp_path)  # doctest: +SKIP
        >>> sdxl.image_size  # doctest: +SKIP
        64
    """
    root = Path(root)
    stamp = {"version": TINY_SDXL_VERSION, "seed": seed}
    tiny = TinySDXL(root=root, base=root / "base", refiner=root / "refiner")
    stamp_file = root / "tiny-sdxl.json"
    if stamp_file.is_file() and tiny.base.is_dir() and tiny.refiner.is_dir():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return tiny
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    # build in a temporary sibling, then swap in: a crash never leaves half a model behind
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-sdxl-", dir=root))
    try:
        _save_base_and_refiner(tmp, seed)
        for name in ("base", "refiner"):
            if (root / name).exists():
                shutil.rmtree(root / name)
            os.replace(tmp / name, root / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(stamp_file, json.dumps(stamp))
    return tiny


def tiny_joint_model(root: str | os.PathLike[str]) -> Any:
    """The tiny joint model J of :mod:`jmllm.joint.testing`, built (or reused) under ``root``."""
    from jmllm.joint import testing as joint_testing

    return joint_testing.tiny_joint_model(root)
