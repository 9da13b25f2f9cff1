"""Train the alignment layer W online between two frozen encoders (teacher/student).

Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024, arXiv 2405.14612), supplementary §1: W maps OWL-ViT's penultimate patch
tokens ``t`` to the image tokens LLaVA's own projector produces; the loss is the mean squared error
over tokens, every token an independent sample. Paper setting (preset ``paper``): deep MLP, AdamW
lr 1e-4, weight decay 1e-2, batch 16 images, one epoch.

The package's modules, each importing only the ones above it:

1. :mod:`~jmllm.align.train.config`: :class:`TrainConfig` and presets (``presets/*.json``).
2. :mod:`~jmllm.align.train.sources`: image sources (a folder, recursive; a list file; a
   ``datasets`` dataset, optionally streaming), decoded in DataLoader workers; a collate drops
   the images that fail and counts them (never fatal).
3. :mod:`~jmllm.align.train.distributed`: rank, world size and device under ``torchrun``.
4. :mod:`~jmllm.align.train.order`: a seeded permutation per epoch, a fixed held-out subset, and
   per-rank shares of every global batch. The data position is ``(epoch, step_in_epoch)``, so it
   can be restored.
5. :mod:`~jmllm.align.train.checkpoint`: RNG states and checkpoints, written atomically;
   resuming from one gives bit-identical weights to a run that was never interrupted.
6. :mod:`~jmllm.align.train.evaluation`: the per-token error and held-out evaluation.
7. :mod:`~jmllm.align.train.loop`: :func:`train`, the loop (DDP under ``torchrun``, gradient
   accumulation, bf16 autocast on GPU, periodic held-out evaluation, progress bar, metrics
   JSONL), ending with ``save_alignment``.

Example:
    >>> from jmllm.align.train import TrainConfig, load_preset, train
    >>> config = load_preset("paper").replace(images=["photos/"], epochs=1)
    >>> result = train(config, "runs/w")  # doctest: +SKIP
    >>> result.weights_path  # doctest: +SKIP
    PosixPath('runs/w/alignment.safetensors')
"""

from jmllm.align.train.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    save_checkpoint,
    write_atomically,
)
from jmllm.align.train.config import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    METRICS_NAME,
    WEIGHTS_NAME,
    TrainConfig,
    load_preset,
    preset_fields,
    preset_names,
)
from jmllm.align.train.evaluation import EvalResult, evaluate
from jmllm.align.train.loop import TrainingDivergedError, TrainResult, train, uses_bf16
from jmllm.align.train.order import epoch_order, rank_shares, split_held_out
from jmllm.align.train.sources import (
    IMAGE_SUFFIXES,
    DatasetSource,
    DecodedImage,
    ImageBatch,
    ImageSource,
    Normalizations,
    PathSource,
    Pixels,
    collate_drop_failures,
    decode_image,
)
from jmllm.align.train.sources import (
    _decode_all as _decode_all,  # the private names jmllm.align.cli used to import from here
)
from jmllm.align.train.sources import (
    _load_dataset as _load_dataset,
)
from jmllm.align.train.sources import (
    _undecoded_column as _undecoded_column,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "IMAGE_SUFFIXES",
    "METRICS_NAME",
    "WEIGHTS_NAME",
    "DatasetSource",
    "DecodedImage",
    "EvalResult",
    "ImageBatch",
    "ImageSource",
    "Normalizations",
    "PathSource",
    "Pixels",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "collate_drop_failures",
    "decode_image",
    "epoch_order",
    "evaluate",
    "load_checkpoint",
    "load_preset",
    "preset_fields",
    "preset_names",
    "rank_shares",
    "save_checkpoint",
    "split_held_out",
    "train",
    "uses_bf16",
    "write_atomically",
]
