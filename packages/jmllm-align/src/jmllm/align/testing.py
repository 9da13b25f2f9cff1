"""Tiny OWL-ViT and LLaVA checkpoints built offline, and the real-size configs (DESIGN §4).

Tests, demos and benchmarks never reach the Hugging Face Hub. Instead this module builds small
random-weight models with the real architectures, trains their tokenizers in-process with
``tokenizers``, and saves everything with ``save_pretrained`` so that the *same*
``from_pretrained`` code path users take with Hub ids is exercised on local folders.

The two tiny models have equal token grids (6×6 patches), like the real pair (24×24).

Example:
    >>> from jmllm.align.testing import build_tiny_checkpoints
    >>> ckpt = build_tiny_checkpoints("/tmp/jmllm-tiny")  # doctest: +SKIP
    >>> ckpt.owl, ckpt.llava  # two folders loadable with from_pretrained  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jmllm.align.files import atomic_write_bytes, atomic_write_text, folder_mode, open_nofollow

TINY_VERSION = 1  # bump when the tiny recipe changes, so cached folders are rebuilt

# Words the tiny tokenizers know well: the paper's prompts, the user-study objects, digits.
_CORPUS = [
    "USER: <image>\nWhat's the content of the image? ASSISTANT: The image shows a bird.",
    "USER: <image>\nWhat's in the image? ASSISTANT: The image shows a bird on a branch.",
    "From one to ten, how likely is the person to be a man? Only answer with a number from 1 to 10.",
    "From one to ten, how likely is the person to be a woman? 1 2 3 4 5 6 7 8 9 10",
    "a photo of a cat. a photo of a dog. a photo of a person. a photo of a horse.",
    "a photo of a bus, a car, a boat, a motorbike, a bird, a tv, a monitor, a couch, a bench.",
    "There are two people in the image, both on skis in the snow near the trees.",
    "The bus in the image is red and white. The dog has a purple collar and white fur.",
    "A headshot of a man in his 40s, DSLR, detailed, 8k, in perfect focus, shoulder height",
    "The cat is sitting on the couch in a living room with red curtains and pillows.",
]


def require_tokenizers(extra: str = "jmllm-align[testing]") -> Any:
    """The ``tokenizers`` module, which only the tiny test models need (an extra, ``extra``).

    Raises:
        ImportError: one line naming the extra to install.

    Example:
        >>> require_tokenizers().__name__
        'tokenizers'
    """
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            f"the tiny test models need the tokenizers package: pip install '{extra}'"
        ) from None
    return tokenizers


def _train_bpe(
    vocab_size: int,
    specials: list[str],
    corpus: list[str] | None = None,
    split_punctuation: bool = False,
) -> Any:
    tk = require_tokenizers()
    Tokenizer, decoders, models = tk.Tokenizer, tk.decoders, tk.models
    pre_tokenizers, trainers = tk.pre_tokenizers, tk.trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    if split_punctuation:
        # as a real Llama tokenizer: punctuation and line breaks are tokens of their own, never
        # merged into a word ("cross?" is "▁cross" + "?", as in "the cross")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(),
                pre_tokenizers.Punctuation("isolated"),
                pre_tokenizers.Split("\n", "isolated"),
            ]
        )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=list(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-/\n "
        ),
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer)
    return tok


def tiny_llava_tokenizer(
    corpus: list[str] | None = None,
    vocab_size: int = 320,
    specials: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>"),
    split_punctuation: bool = False,
) -> Any:
    """A Llama-style tokenizer (BOS added, ``<image>`` special) trained in-process.

    Args:
        corpus: the texts to train the BPE on (None: this module's small English corpus).
        vocab_size, specials: the vocabulary's size and its special tokens, first ids first.
        split_punctuation: punctuation and line breaks are tokens of their own (as Llama's),
            never merged with a word.

    Example:
        >>> tok = tiny_llava_tokenizer()
        >>> tok("a cat").input_ids[0] == tok.bos_token_id
        True
    """
    processors = require_tokenizers().processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(vocab_size, list(specials), corpus, split_punctuation)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return fast


# Ids of LLaVA-1.5's tokenizer (Llama's SentencePiece vocabulary) that prompts start with.
LLAVA_1_5_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<0x0A>": 13,  # "\n", a byte-fallback token (bytes <0x00>..<0xFF> are ids 3..258)
    "▁U": 501,
    "ER": 1001,
    "▁US": 3148,
    "▁": 29871,
    ":": 29901,
    "<image>": 32000,
    "<pad>": 32001,
}


def llava_1_5_tokenizer(folder: str | os.PathLike[str] | None = None) -> Any:
    """A tokenizer built like LLaVA-1.5's, whose ids for the prompts' opening are the real ones.

    A Llama BPE with byte fallback over 32 000 ids (``<unk>``, ``<s>``, ``</s>``, the 256 byte
    tokens at 3–258, ``▁`` at 29871, ``▁US`` 3148, ``ER`` 1001, ``:`` 29901, the ASCII letters,
    digits and punctuation as single-character tokens, unused fillers elsewhere), then
    ``<image>`` (32000) and ``<pad>`` (32001): so ``USER: <image>\n`` is ``1, 3148, 1001,
    29901, 29871, 32000, …`` as with ``llava-hf/llava-1.5-7b-hf``. Only the listed ids are the
    real vocabulary's; other text is spelled in single characters.

    Args:
        folder: where to save it with ``llava-hf``'s ``tokenizer_config.json`` flags
            (``legacy: false``); it is then loaded back through ``AutoTokenizer`` (the path a
            checkpoint takes). None: returned as built.

    Example:
        >>> tok = llava_1_5_tokenizer()
        >>> tok("USER: <image>").input_ids
        [1, 3148, 1001, 29901, 29871, 32000]
    """
    require_tokenizers()
    from transformers import AutoTokenizer, LlamaTokenizer

    ids = {f"<0x{b:02X}>": 3 + b for b in range(256)}
    ids.update({k: v for k, v in LLAVA_1_5_IDS.items() if v < 32000})
    free = iter(i for i in range(29872, 32000) if i not in ids.values())
    for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;?!'\"-/()":
        ids.setdefault(char, next(free))
    by_id = {v: k for k, v in ids.items()}
    vocab = {by_id.get(i, f"<unused{i}>"): i for i in range(32000)}
    merges = [("▁", "U"), ("▁U", "S"), ("E", "R")]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    if folder is None:
        return tok
    folder = Path(folder)
    tok.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(legacy=False, add_bos_token=True, add_eos_token=False, padding_side="left")
    atomic_write_text(config_path, json.dumps(config, indent=2))
    return AutoTokenizer.from_pretrained(folder)


def tiny_owl_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = 200, max_length: int = 16
) -> Any:
    """A CLIP-style tokenizer whose end-of-text token has the largest id (OWL-ViT pools at argmax).

    Args:
        corpus: the texts to train the BPE on (None: this module's small English corpus).
        vocab_size: the vocabulary's size before the end-of-text token.
        max_length: the text model's positions.

    Example:
        >>> tok = tiny_owl_tokenizer()
        >>> ids = tok("a cat").input_ids
        >>> ids[-1] == tok.eos_token_id == max(tok.get_vocab().values())
        True
    """
    processors = require_tokenizers().processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(vocab_size, ["<pad>", "<unk>", "<|startoftext|>"], corpus)
    tok.add_special_tokens(["<|endoftext|>"])  # last id, as in CLIP
    sot, eot = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def tiny_owl_config(tokenizer: Any = None) -> Any:
    """OWL-ViT with a 6×6 patch grid (96 px, patch 16) and 32-wide layers."""
    from transformers import OwlViTConfig

    tokenizer = tokenizer or tiny_owl_tokenizer()
    return OwlViTConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "image_size": 96,
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        },
        projection_dim=32,  # OWL-ViT's class head needs projection_dim == text hidden size
    )


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    """LLaVA with a 6×6 CLIP grid (84 px, patch 14) and a 2-layer, 48-wide Llama."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 84,
            "patch_size": 14,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "pad_token_id": pad_token_id,
        },
        image_token_id=image_token_id,
        pad_token_id=pad_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_1_5_7b_config() -> Any:
    """The published ``llava-hf/llava-1.5-7b-hf`` configuration, written out (no Hub access)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
            "vocab_size": 32000,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "pad_token_id": 32001,
        },
        image_token_id=32000,
        pad_token_id=32001,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def owlvit_b32_config() -> Any:
    """OWL-ViT B/32 (``google/owlvit-base-patch32``) is the library default ``OwlViTConfig()``."""
    from transformers import OwlViTConfig

    return OwlViTConfig()


def tiny_owlv2_config(tokenizer: Any = None) -> Any:
    """OWLv2 with an 8×8 patch grid (128 px, patch 16) and 32-wide layers: a larger grid than the
    tiny MLLMs' 6×6, so J resamples it as it does OWLv2 base's 60×60 onto LLaVA-1.5's 24×24."""
    from transformers import Owlv2Config

    base = tiny_owl_config(tokenizer)
    vision = {**base.vision_config.to_dict(), "image_size": 128}
    for key in ("model_type", "transformers_version"):
        vision.pop(key, None)
    text = {k: v for k, v in base.text_config.to_dict().items() if k != "model_type"}
    text.pop("transformers_version", None)
    return Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)


def owlv2_base_config() -> Any:
    """OWLv2 base/16 (``google/owlv2-base-patch16-ensemble``): the library default
    ``Owlv2Config()`` at its published 960 px input (a 60×60 patch grid).

    Example:
        >>> owlv2_base_config().vision_config.image_size
        960
    """
    from transformers import Owlv2Config

    return Owlv2Config(vision_config={"image_size": 960})


def calibrate_owl_heads(owl: Any) -> None:
    """Rescale an OWL detector's heads (class, box and, for OWLv2, objectness) to a
    1/sqrt(fan-in) initialisation: default-initialised heads saturate every score and box.

    Example:
        >>> calibrate_owl_heads(owl)  # doctest: +SKIP
    """
    heads = [owl.box_head.dense0, owl.box_head.dense1, owl.box_head.dense2]
    heads += [owl.class_head.dense0, owl.class_head.logit_shift, owl.class_head.logit_scale]
    objectness = getattr(owl, "objectness_head", None)
    if objectness is not None:
        heads += [objectness.dense0, objectness.dense1, objectness.dense2]
    with torch.no_grad():
        for linear in heads:
            linear.weight.mul_(linear.weight.shape[1] ** -0.5)


def _save_owlv2(folder: Path, seed: int) -> None:
    from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = tiny_owl_tokenizer()
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(tiny_owlv2_config(tokenizer)).eval()
    calibrate_owl_heads(model)
    image_processor = Owlv2ImageProcessor(size={"height": 128, "width": 128})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_owlv2(root: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build (or reuse) a tiny OWLv2 checkpoint (:func:`tiny_owlv2_config`, calibrated heads)
    in ``root/owlv2``, loadable with ``Owlv2ForObjectDetection.from_pretrained`` and
    ``Owlv2Processor.from_pretrained``.

    Example:
        >>> folder = build_tiny_owlv2(tmp_path)  # doctest: +SKIP
        >>> Owlv2ForObjectDetection.from_pretrained(folder)  # doctest: +SKIP
    """
    root = Path(root)
    folder = root / "owlv2"
    stamp = root / "owlv2.json"
    want = json.dumps({"seed": seed, "version": 1})
    if folder.is_dir() and stamp.is_file() and stamp.read_text() == want:
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    _atomic_dir(folder, lambda d: _save_owlv2(d, seed))
    atomic_write_text(stamp, want)
    return folder


@dataclass(frozen=True)
class TinyCheckpoints:
    """Folders of a tiny OWL-ViT and a tiny LLaVA, each loadable with ``from_pretrained``."""

    root: Path
    owl: Path
    llava: Path


def _save_owl(folder: Path, seed: int) -> None:
    from transformers import OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    tokenizer = tiny_owl_tokenizer()
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(tiny_owl_config(tokenizer)).eval()
    image_processor = OwlViTImageProcessor(
        size={"height": 96, "width": 96},
        crop_size={"height": 96, "width": 96},
        do_center_crop=False,
    )
    processor = OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_llava(folder: Path, seed: int) -> None:
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_llava_tokenizer()
    config = tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random weights give near-uniform logits; a larger scale makes greedy answers vary by image.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"height": 84, "width": 84},
        crop_size={"height": 84, "width": 84},
        do_center_crop=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _atomic_dir(target: Path, build: Any) -> None:
    """Build into a temporary sibling folder, then rename, so a crash never leaves half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    import shutil

    try:
        build(tmp)
        os.chmod(tmp, folder_mode())  # mkdtemp's 0700 would hide the cache from others
        os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-built temporary folder left behind
        # another process won the race to rename; its copy is as good as ours
        if not (isinstance(exc, OSError) and target.is_dir()):
            raise


def build_tiny_checkpoints(root: str | os.PathLike[str], seed: int = 0) -> TinyCheckpoints:
    """Build (or reuse, when already built with this recipe) tiny OWL-ViT and LLaVA checkpoints.

    Args:
        root: folder to hold ``owlvit/`` and ``llava/``; reused when its stamp matches.
        seed: seed of the random weights.

    Returns:
        The two folders, ready for ``from_pretrained``.

    Example:
        >>> ckpt = build_tiny_checkpoints(tmp_path)  # doctest: +SKIP
        >>> from transformers import OwlViTForObjectDetection
        >>> OwlViTForObjectDetection.from_pretrained(ckpt.owl)  # doctest: +SKIP
    """
    root = Path(root)
    stamp = {"version": TINY_VERSION, "seed": seed}
    ckpt = TinyCheckpoints(root=root, owl=root / "owlvit", llava=root / "llava")
    stamp_file = root / "tiny.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        if ckpt.owl.is_dir() and ckpt.llava.is_dir():
            return ckpt
    root.mkdir(parents=True, exist_ok=True)
    import shutil

    for folder in (ckpt.owl, ckpt.llava):
        if folder.exists():
            shutil.rmtree(folder)
    _atomic_dir(ckpt.owl, lambda d: _save_owl(d, seed))
    _atomic_dir(ckpt.llava, lambda d: _save_llava(d, seed + 1))
    atomic_write_text(stamp_file, json.dumps(stamp))
    return ckpt


def generated_images(count: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Simple, varied RGB images (random rectangles and ellipses on a gradient) for tests and demos.

    Example:
        >>> [im.size for im in generated_images(2, size=32)]
        [(32, 32), (32, 32)]
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = np.linspace(0, 255, size, dtype=np.float32)
        colour = rng.uniform(0.2, 1.0, size=3)
        pixels = (base[None, :, None] * colour[None, None, :]).repeat(size, axis=0)
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, size // 2, size=2)
            x1, y1 = np.array([x0, y0]) + rng.integers(size // 6, size // 2, size=2)
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([int(x0), int(y0), int(x1), int(y1)], fill=fill)
        images.append(image)
    return images


def write_image_folder(
    folder: str | os.PathLike[str], count: int, size: int = 64, seed: int = 0
) -> Path:
    """Write :func:`generated_images` as PNG/JPEG files into ``folder`` (nested, mixed formats)."""
    folder = Path(folder)
    for i, image in enumerate(generated_images(count, size=size, seed=seed)):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i % 2 else ".jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if i % 2 else "JPEG")
        atomic_write_bytes(sub / f"img{i:04d}{suffix}", buffer.getvalue())
    return folder


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, since it started (or exec'd).

    Linux's ``VmHWM`` (``/proc/self/status``) belongs to the process's own address space; the
    ``ru_maxrss`` of ``getrusage`` also counts what a parent held when it forked the process, so
    a child started from a large test runner would report the runner's memory. ``ru_maxrss`` is
    the fallback elsewhere.

    Example:
        >>> peak_rss_mb() > 0
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def png_claiming(width: int, height: int, rows: int = 0) -> bytes:
    """A greyscale PNG whose header claims ``width`` x ``height`` pixels, for image-policy tests.

    ``rows`` all-zero rows of real data follow: 0 gives a few hundred bytes (a header that lies,
    refused from the header alone), ``height`` a genuine, highly compressed decompression bomb
    (28000 x 28000 is 784 megapixels in 3.4 MB).

    Example:
        >>> from PIL import Image
        >>> import io
        >>> Image.open(io.BytesIO(png_claiming(300, 200))).size
        (300, 200)
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    compressor = zlib.compressobj(1)
    row = b"\x00" * (width + 1)  # filter byte, then the pixels
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_KINDS = {"I;16": (16, 0, 2), "L": (8, 0, 1), "RGB": (8, 2, 3), "RGBA": (8, 6, 4)}


def write_large_png(path: str | os.PathLike[str], width: int, height: int, mode: str) -> Path:
    """Write a ``width`` x ``height`` PNG without ever holding its pixels: every row is the same
    gradient (stored once, then as PNG "Up" rows of zeros), so a 400-megapixel image is a file
    of a few MB, written in seconds. ``mode``: ``I;16`` (16-bit grey), ``L``, ``RGB``, ``RGBA``
    (alpha falls along the row). For the image-memory tests.

    Example:
        >>> import tempfile
        >>> p = write_large_png(Path(tempfile.mkdtemp()) / "g.png", 300, 200, "I;16")
        >>> Image.open(p).mode, Image.open(p).size
        ('I;16', (300, 200))
    """
    import struct
    import zlib

    bits, colour, channels = _PNG_KINDS[mode]
    ramp = (np.arange(width) * 7919) % 65536  # (width,)
    if bits == 16:
        row = ramp.astype(">u2").tobytes()
    else:
        samples = np.stack(
            [(ramp >> 8) % 256, (ramp >> 4) % 256, ramp % 256, 255 - (np.arange(width) % 256)],
            axis=-1,
        )[:, :channels]  # (width, channels)
        row = samples.astype(np.uint8).tobytes()
    header = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    compressor = zlib.compressobj(9)
    zeros = b"\x02" + bytes(len(row))  # "Up": the same as the row above
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_nofollow(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header))
        f.write(_png_chunk(b"IDAT", compressor.compress(b"\x00" + row)))
        batch = max(1, (8 << 20) // len(zeros))  # rows per call: few calls, 8 MB at a time
        for start in range(1, height, batch):
            data = compressor.compress(zeros * min(batch, height - start))
            if data:
                f.write(_png_chunk(b"IDAT", data))
        f.write(_png_chunk(b"IDAT", compressor.flush()) + _png_chunk(b"IEND", b""))
    return target


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def png_with_filters(
    samples: np.ndarray,
    bits: int,
    colour: int,
    *,
    palette: bytes | None = None,
    transparency: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """A PNG of ``samples`` (height, width[, channels]) whose rows cycle through all five PNG
    filters (None, Sub, Up, Average, Paeth), in IDAT chunks of 1000 bytes: the cases a
    strip-by-strip decoder must get right at every strip boundary.

    Args:
        samples: integer samples of ``bits`` bits each (1, 2, 4, 8 or 16).
        bits, colour: the PNG bit depth and colour type (0 grey, 2 RGB, 3 palette, 4 grey +
            alpha, 6 RGBA).
        palette, transparency, exif: PLTE, tRNS and eXIf chunk contents, if any.

    Example:
        >>> import io
        >>> data = png_with_filters(np.arange(12).reshape(3, 4) * 5000, 16, 0)
        >>> Image.open(io.BytesIO(data)).getpixel((3, 2))
        55000
    """
    import struct
    import zlib

    height, width = samples.shape[:2]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    flat = np.asarray(samples).reshape(height, width * channels)  # (h, w * channels)
    if bits == 16:
        raw = flat.astype(">u2").view(np.uint8).reshape(height, -1)
    elif bits == 8:
        raw = flat.astype(np.uint8)
    else:  # pack 8 // bits samples per byte, the first in the high bits
        per = 8 // bits
        padded = np.zeros((height, -(-flat.shape[1] // per) * per), np.uint8)
        padded[:, : flat.shape[1]] = flat
        groups = padded.reshape(height, -1, per).astype(np.uint16)
        shifts = np.arange(per - 1, -1, -1) * bits
        raw = (groups << shifts).sum(axis=-1).astype(np.uint8)
    bpp = max(1, channels * bits // 8)
    x = raw.astype(np.int16)  # (h, R)
    up = np.vstack([np.zeros((1, x.shape[1]), np.int16), x[:-1]])
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upleft = np.zeros_like(x)
    upleft[:, bpp:] = up[:, :-bpp]
    predictions = [np.zeros_like(x), left, up, (left + up) // 2, _paeth(left, up, upleft)]
    rows = np.empty((height, x.shape[1] + 1), np.uint8)
    for y in range(height):
        kind = y % 5
        rows[y, 0] = kind
        rows[y, 1:] = (x[y] - predictions[kind][y]) % 256
    data = zlib.compress(rows.tobytes(), 6)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    )
    for name, payload in ((b"PLTE", palette), (b"tRNS", transparency), (b"eXIf", exif)):
        if payload is not None:
            out += _png_chunk(name, payload)
    for start in range(0, len(data), 1000):
        out += _png_chunk(b"IDAT", data[start : start + 1000])
    return out + _png_chunk(b"IEND", b"")


def webp_lossless_constant(
    width: int, height: int, argb: tuple[int, int, int, int] = (255, 200, 30, 60)
) -> bytes:
    """A lossless WebP of one colour, written directly as a VP8L bitstream (a few dozen bytes for
    16383 x 16383, the format's largest): each of its five prefix codes has one symbol, so every
    pixel costs no bits. For the image-memory tests.

    Example:
        >>> import io
        >>> image = Image.open(io.BytesIO(webp_lossless_constant(7, 5)))
        >>> image.size, image.convert("RGB").getpixel((3, 2))
        ((7, 5), (200, 30, 60))
    """
    import struct

    value, used = 0, 0

    def put(bits: int, count: int) -> None:
        nonlocal value, used
        value |= (bits & ((1 << count) - 1)) << used
        used += count

    alpha, red, green, blue = argb
    put(width - 1, 14)
    put(height - 1, 14)
    put(int(alpha != 255), 1)  # alpha is used
    put(0, 3)  # version
    put(0, 1)  # no transform
    put(0, 1)  # no colour cache
    put(0, 1)  # no meta prefix codes
    for symbol in (green, red, blue, alpha, 0):  # the five prefix codes (the last: distances)
        put(1, 1)  # a simple code
        put(0, 1)  # of one symbol
        put(1, 1)  # given in 8 bits
        put(symbol, 8)
    body = b"\x2f" + value.to_bytes((used + 7) // 8, "little")
    chunk = b"VP8L" + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) % 2)
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distributed_worker(
    rank: int, world_size: int, port: int, config: dict[str, Any], out: str, dump: str
) -> None:
    from jmllm.align.train import TrainConfig, train

    torch.set_num_threads(1)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    result = train(TrainConfig.from_dict(config), out)
    assert result.layer is not None
    torch.save(
        {"state": result.layer.state_dict(), "steps": result.steps, "seen": result.images_seen},
        Path(dump) / f"rank{rank}.pt",
    )


def train_distributed_cpu(
    config: Any, out: str | os.PathLike[str], world_size: int = 2, *, fork: bool = True
) -> list[dict[str, Any]]:
    """Run :func:`jmllm.align.train.train` in ``world_size`` CPU processes (gloo), as torchrun would.

    Returns, per rank, ``{"state": W's state dict, "steps": ..., "seen": images seen}``, so a test
    can check that every rank ended with the same weights.

    Example:
        >>> ranks = train_distributed_cpu(config, tmp_path / "run")  # doctest: +SKIP
        >>> torch.equal(ranks[0]["state"]["net.output_layer.weight"],
        ...             ranks[1]["state"]["net.output_layer.weight"])  # doctest: +SKIP
        True
    """
    import torch.multiprocessing as mp

    dump = Path(tempfile.mkdtemp(prefix="jmllm-ddp-"))
    try:
        # fork: the children inherit the imported torch/transformers (spawn re-imports them,
        # which costs tens of seconds on a small shared CPU). CPU only, so no CUDA state is forked.
        mp.start_processes(
            _distributed_worker,
            args=(world_size, _free_port(), config.to_dict(), str(out), str(dump)),
            nprocs=world_size,
            join=True,
            start_method="fork" if fork else "spawn",
        )
        return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    finally:
        import shutil

        shutil.rmtree(dump, ignore_errors=True)
