"""Data order: a fixed held-out subset, a seeded permutation per epoch, and per-rank shares.

The data position is ``(epoch, step_in_epoch)``: :func:`epoch_loader` starts an epoch at any step,
so a resumed run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from jmllm.align.train.config import TrainConfig
from jmllm.align.train.distributed import _Dist
from jmllm.align.train.sources import (
    DatasetSource,
    ImageSource,
    Normalizations,
    PathSource,
    _DecodeItems,
    _load_dataset,
    _stream_batches,
    _stream_shares,
    _undecoded_column,
    _worker_init,
    collate_drop_failures,
)


def split_held_out(count: int, eval_images: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded held-out subset of ``count`` items and the rest (training), as indices.

    Example:
        >>> held_out, train_ids = split_held_out(10, 3, seed=0)
        >>> len(held_out), len(train_ids), sorted(held_out + train_ids) == list(range(10))
        (3, 7, True)
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator).tolist()
    held_out = sorted(order[:eval_images])
    return held_out, sorted(order[eval_images:])


def epoch_order(train_ids: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The training items of one epoch in their seeded order (a permutation per epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return [train_ids[i] for i in torch.randperm(len(train_ids), generator=generator).tolist()]


def rank_shares(
    order: Sequence[int], batch_size: int, rank: int, world: int, start_step: int
) -> list[list[int]]:
    """For each remaining step of an epoch, this rank's items of the global batch.

    Like ``DistributedSampler`` applied to each global batch: rank ``r`` takes items
    ``r, r + world, ...``; the last incomplete global batch is dropped.

    Example:
        >>> rank_shares(list(range(8)), batch_size=4, rank=1, world=2, start_step=0)
        [[1, 3], [5, 7]]
    """
    steps = len(order) // batch_size
    return [
        list(order[s * batch_size : (s + 1) * batch_size][rank::world])
        for s in range(start_step, steps)
    ]


@dataclass
class TrainingData:
    """A run's images: the source (or stream), the training items and this rank's held-out share."""

    source: ImageSource | None  # None when streaming
    stream: Any  # streaming only: the stream after its held-out rows
    train_ids: list[int]  # indices into source (empty when streaming)
    held_out_items: list[Any]  # this rank's held-out indices (streaming: raw images)
    total_steps: int | None  # optimizer steps of the whole run (None: a stream without max_steps)

    def held_out_raw(self) -> list[Any]:
        """This rank's held-out images, undecoded."""
        if self.source is None:
            return self.held_out_items
        return [self.source.raw(i) for i in self.held_out_items]


def training_data(config: TrainConfig, info: _Dist) -> TrainingData:
    """Open the run's image source and split it into held-out and training items.

    Raises:
        ValueError: no images, or fewer training images than one batch (the message says which).
    """
    stream = None
    train_ids: list[int] = []
    if config.dataset:
        loaded = _load_dataset(config)
        if config.dataset_streaming:
            stream = _undecoded_column(loaded, config.image_column)
            held_raw = [row[config.image_column] for row in stream.take(config.eval_images)]
            held_out_items: list[Any] = held_raw[info.rank :: info.world]
            stream = stream.skip(config.eval_images)
            source: ImageSource | None = None
        else:
            source = DatasetSource(loaded, config.image_column)
    elif config.images:
        source = PathSource(config.images)
    else:
        raise ValueError("no training images: pass image folders/list files or a dataset")
    if source is not None:
        if len(source) == 0:
            raise ValueError(f"no images found in {', '.join(config.images) or config.dataset}")
        held_ids, train_ids = split_held_out(len(source), config.eval_images, config.seed)
        if len(train_ids) < config.batch_size:
            raise ValueError(
                f"{len(train_ids)} training images (after holding out {len(held_ids)}) are fewer "
                f"than one batch of {config.batch_size} (lower eval_images or batch_size)"
            )
        held_out_items = held_ids[info.rank :: info.world]
    steps_per_epoch = len(train_ids) // config.batch_size if source is not None else None
    total_steps = steps_per_epoch * config.epochs if steps_per_epoch is not None else None
    if config.max_steps is not None:
        total_steps = min(total_steps or config.max_steps, config.max_steps)
    return TrainingData(source, stream, train_ids, held_out_items, total_steps)


def epoch_loader(
    config: TrainConfig,
    source: ImageSource | None,
    train_ids: list[int],
    stream: Any,
    epoch: int,
    start_step: int,
    info: _Dist,
    norms: Normalizations | None,
) -> Any:
    """The DataLoader of one epoch, starting at ``start_step`` (resume), yielding ImageBatch."""
    workers = max(0, config.num_workers)
    common: dict[str, Any] = {
        "num_workers": workers,
        "worker_init_fn": _worker_init,
        "prefetch_factor": 4 if workers else None,
    }
    if source is None:  # streaming
        shuffled = stream
        if config.shuffle_buffer > 0:
            shuffled = stream.shuffle(seed=config.seed, buffer_size=config.shuffle_buffer)
            shuffled.set_epoch(epoch)
        stream_shares = _stream_shares(
            shuffled, config.image_column, config.batch_size, info.rank, info.world, start_step
        )
        return _stream_batches(stream_shares, norms, workers, config.preprocessing)
    order = epoch_order(train_ids, config.seed, epoch)
    shares = rank_shares(order, config.batch_size, info.rank, info.world, start_step)
    return DataLoader(
        _DecodeItems(source, norms, config.preprocessing),
        batch_sampler=shares,
        collate_fn=collate_drop_failures,
        **common,
    )
