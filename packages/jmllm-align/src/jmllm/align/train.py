"""Train the alignment layer W online between two frozen encoders (teacher/student).

Giulivi and Boracchi, *Explaining Multi-modal Large Language Models by Analyzing their Vision
Perception* (BMVC 2024, arXiv 2405.14612), supplementary §1: W maps OWL-ViT's penultimate patch
tokens ``t`` to the image tokens LLaVA's own projector produces; the loss is the mean squared error
over tokens, every token an independent sample. Paper setting (preset ``paper``): deep MLP, AdamW
lr 1e-4, weight decay 1e-2, batch 16 images, one epoch.

The file reads top to bottom:

1. :class:`TrainConfig` and presets (``presets/*.json``).
2. Image sources: a folder (recursive), a list file, or a ``datasets`` dataset (optionally
   streaming). Images are decoded in DataLoader workers; a collate drops the ones that fail and
   counts them (never fatal).
3. Data order: a seeded permutation per epoch, a fixed held-out subset, and per-rank shards of
   every global batch. The data position is ``(epoch, step_in_epoch)``, so it can be restored.
4. Checkpoints: written atomically; resuming from one gives bit-identical weights to a run that
   was never interrupted.
5. :func:`train`: the loop (DDP under ``torchrun``, gradient accumulation, bf16 autocast on GPU,
   periodic held-out evaluation, progress bar, metrics JSONL), ending with ``save_alignment``.

Example:
    >>> from jmllm.align.train import TrainConfig, load_preset, train
    >>> config = load_preset("paper").replace(images=["photos/"], epochs=1)
    >>> result = train(config, "runs/w")  # doctest: +SKIP
    >>> result.weights_path  # doctest: +SKIP
    PosixPath('runs/w/alignment.safetensors')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from jmllm.align.architectures import ARCHITECTURES, AlignmentLayer, alignment_config_for
from jmllm.align.features import (
    FeatureExtractor,
    ImageNormalization,
    image_to_tensor,
    llava_image_tokens,
    owl_penultimate,
)
from jmllm.align.files import atomic_write
from jmllm.align.images import ImageLoadError, load_image, open_image
from jmllm.align.options import check_finite
from jmllm.align.weights import save_alignment

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "alignment.safetensors"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = "jmllm-align-checkpoint"


# ----------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in checkpoints and ``config.json``)."""

    # The two frozen encoders: Hub ids or local folders.
    source_model: str = "google/owlvit-base-patch32"  # OWL-ViT: gives t
    target_model: str = "llava-hf/llava-1.5-7b-hf"  # LLaVA: gives the target image tokens
    # W's architecture; None keeps the architecture's default (deep-mlp: hidden 8192, 2 layers).
    architecture: str = "deep-mlp"
    hidden_dim: int | None = None
    num_hidden_layers: int | None = None
    num_heads: int | None = None
    # Data: folders / list files (concatenated, in order), or one `datasets` dataset.
    images: list[str] = field(default_factory=list)
    dataset: str | None = None  # name for datasets.load_dataset (e.g. "imagefolder")
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_data_dir: str | None = None  # data_dir= for load_dataset (local builders)
    dataset_streaming: bool = False  # stream instead of downloading the whole dataset
    image_column: str = "image"
    shuffle_buffer: int = 10_000  # streaming only: shuffle buffer size (0 = stream order)
    # Optimisation (paper: AdamW lr 1e-4, wd 1e-2, 16 images per step, one epoch).
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None  # the paper does not clip
    batch_size: int = 16  # images per optimizer step, summed over all ranks
    micro_batch_size: int | None = None  # images per forward on one rank (None: whole share)
    epochs: int = 1
    max_steps: int | None = None  # stop (and save) after this many optimizer steps in total
    seed: int = 0  # W's init, the data order and the held-out subset
    # "fp32" (the paper preset: the authors trained in float32), "bf16" (encoders in bfloat16,
    # W under bf16 autocast) or "auto" (bf16 on GPU, fp32 on CPU).
    precision: str = "auto"
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when available, else cpu
    # Where images are resized/normalised: "workers" (DataLoader processes, frees the main
    # process on CPU), "device" (batched on the GPU), or "auto" (device on GPU, else workers).
    preprocess: str = "auto"
    # Held-out evaluation: a fixed subset never trained on.
    eval_images: int = 256
    eval_every: int = 1000  # steps between evaluations (0: only at the end)
    # Bookkeeping (changing these does not change the weights).
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end)
    log_every: int = 10  # steps between metrics rows
    num_workers: int = 4  # DataLoader processes decoding images
    progress: bool = True  # tqdm progress bar on rank 0

    # Fields that may differ between a checkpoint and the run resuming it.
    RESUMABLE_CHANGES = (
        "max_steps",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "num_workers",
        "progress",
        "device",
    )

    def __post_init__(self) -> None:
        """Check every field's type and range (a value from ``--set`` or a preset included):
        a wrong one is a ``ValueError`` naming the field, before anything is loaded."""
        for name, kind in _TEXT_FIELDS.items():
            value = getattr(self, name)
            if not (isinstance(value, str) or (kind == "optional" and value is None)):
                raise ValueError(f"{name}: must be text, got {value!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        for name, (low, optional) in _INT_FIELDS.items():
            value = getattr(self, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"{name}: must be >= {low}, got {value}")
        for name, (bound, open_low, optional) in _FLOAT_FIELDS.items():
            number = getattr(self, name)
            if optional and number is None:
                continue
            check_finite(number, name, bound, open_low=open_low)
            setattr(self, name, float(number))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"betas: must be two numbers, got {self.betas!r}")
        self.betas = tuple(  # type: ignore[assignment]
            float(check_finite(b, f"betas[{i}]", 0.0, 1.0, open_high=True))
            for i, b in enumerate(self.betas)
        )
        if not isinstance(self.images, (list, tuple)):
            raise ValueError(
                f"images: must be a list of folders or list files, got {self.images!r}"
            )
        self.images = [str(p) for p in self.images]
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture: must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.preprocess not in ("auto", "workers", "device"):
            raise ValueError(f"preprocess must be auto, workers or device, got {self.preprocess!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a preset or a checkpoint); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (unknown names are an error)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# Types and ranges of TrainConfig's fields (checked in __post_init__).
_TEXT_FIELDS = {
    "source_model": "required",
    "target_model": "required",
    "architecture": "required",
    "dataset": "optional",
    "dataset_config": "optional",
    "dataset_split": "required",
    "dataset_data_dir": "optional",
    "image_column": "required",
    "precision": "required",
    "device": "required",
    "preprocess": "required",
}
_BOOL_FIELDS = ("dataset_streaming", "progress")
_INT_FIELDS = {  # name: (minimum, may be None)
    "hidden_dim": (1, True),
    "num_hidden_layers": (1, True),
    "num_heads": (1, True),
    "shuffle_buffer": (0, False),
    "batch_size": (1, False),
    "micro_batch_size": (1, True),
    "epochs": (1, False),
    "max_steps": (1, True),
    "seed": (0, False),
    "eval_images": (0, False),
    "eval_every": (0, False),
    "checkpoint_every": (0, False),
    "log_every": (0, False),
    "num_workers": (0, False),
}
_FLOAT_FIELDS = {  # name: (minimum, minimum excluded, may be None)
    "lr": (0.0, True, False),
    "weight_decay": (0.0, False, False),
    "grad_clip": (0.0, True, True),
}


def preset_names() -> list[str]:
    """Names of the built-in presets (``paper``, ``tiny``, ...)."""
    folder = resources.files("jmllm.align") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str | os.PathLike[str]) -> TrainConfig:
    """A :class:`TrainConfig` from a built-in preset name or a JSON file of fields.

    Example:
        >>> load_preset("paper").lr
        0.0001
    """
    return TrainConfig.from_dict(preset_fields(name_or_path))


def preset_fields(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields a preset (built-in name or JSON file) sets itself, as stored in it.

    Example:
        >>> preset_fields("tiny")["hidden_dim"]
        64
    """
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    else:
        resource = resources.files("jmllm.align") / "presets" / f"{name_or_path}.json"
        if not resource.is_file():
            raise ValueError(
                f"{name_or_path}: no such preset (built-in: {', '.join(preset_names())}) "
                "and not a .json file"
            )
        text = resource.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name_or_path}: preset is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name_or_path}: preset must be a JSON object of training options")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys


# ----------------------------------------------------------------------------------------------
# 2. Image sources


class ImageSource:
    """An indexable collection of raw images (paths, bytes or PIL images), decoded lazily."""

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> Any:
        raise NotImplementedError


class PathSource(ImageSource):
    """Image files: every image under folders (recursively) and every line of list files."""

    def __init__(self, entries: Sequence[str | os.PathLike[str]]) -> None:
        paths: list[str] = []
        for entry in entries:
            entry = Path(entry)
            if entry.is_dir():
                found = [
                    p
                    for p in entry.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                ]
                paths.extend(str(p) for p in sorted(found))  # sorted: the order is the seed's
            elif entry.is_file():
                paths.extend(_read_list_file(entry))
            else:
                raise ValueError(f"{entry}: no such image folder or list file")
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int) -> Any:
        return self.paths[index]


def _read_list_file(path: Path) -> list[str]:
    """One image path per line; blank lines and ``#`` comments ignored; relative to the file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the image list ({exc})") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        out.append(str(p if p.is_absolute() else path.parent / p))
    return out


class DatasetSource(ImageSource):
    """An image column of a (non-streaming) ``datasets`` dataset; decoding happens in workers."""

    def __init__(self, dataset: Any, image_column: str) -> None:
        self.dataset = _undecoded_column(dataset, image_column)
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, index: int) -> Any:
        return self.dataset[index][self.image_column]


def _undecoded_column(dataset: Any, column: str) -> Any:
    import datasets

    names = list(dataset.features or {}) if dataset.features is not None else []
    if names and column not in names:
        raise ValueError(
            f"dataset has no image column {column!r} (columns: {', '.join(names)}); "
            "pass --image-column"
        )
    if dataset.features is not None and isinstance(dataset.features.get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _load_dataset(config: TrainConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            config.dataset,
            config.dataset_config,
            split=config.dataset_split,
            streaming=config.dataset_streaming,
            data_dir=config.dataset_data_dir,
        )
    except Exception as exc:  # datasets raises many types: network, missing config, ...
        raise ValueError(f"dataset {config.dataset}: could not be loaded ({exc})") from None


def decode_image(raw: Any) -> torch.Tensor:
    """Decode one raw image (path, ``{"bytes", "path"}`` dict, bytes or PIL) to (3, H, W) uint8,
    under the image policy (:mod:`jmllm.align.images`: pixel limit from the header, reduced
    JPEG decoding, working copy of at most 4096 px).

    Raises:
        ImageLoadError: the image cannot be decoded or is refused; the message names it.
    """
    name = None
    if isinstance(raw, dict):
        data, name = raw.get("bytes"), raw.get("path") or "<bytes>"
        raw = data if data is not None else name
    try:
        return image_to_tensor(
            load_image(raw) if name is None else open_image(raw, name=name).image
        )
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises assorted errors on odd files during conversion
        raise ImageLoadError(f"{name or raw}: not a readable image ({exc})") from None


# A decoded image is either (3, H, W) uint8 pixels, normalised on the training device, or, when
# preprocessing runs in the workers (CPU training), the pair of normalised model inputs
# ((3, S_owl, S_owl), (3, S_llava, S_llava)) float32: the same ImageNormalization code either way.
Pixels = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Normalizations = tuple[ImageNormalization, ImageNormalization]


@dataclass
class DecodedImage:
    """One image after decoding in a worker: its pixels, or the error that made it unreadable."""

    pixels: Pixels | None
    error: str | None = None


@dataclass
class ImageBatch:
    """A rank's decoded images for one optimizer step, with the failures dropped and counted."""

    images: list[Pixels]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _decode(raw: Any, norms: Normalizations | None = None) -> DecodedImage:
    try:
        pixels = decode_image(raw)
    except ImageLoadError as exc:
        return DecodedImage(None, str(exc))
    if norms is None:
        return DecodedImage(pixels)
    return DecodedImage((norms[0]([pixels])[0], norms[1]([pixels])[0]))


def _model_inputs(fx: FeatureExtractor, chunk: list[Pixels]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (B, 3, S, S) inputs of both encoders on fx's device, for decoded images."""
    if isinstance(chunk[0], tuple):  # normalised in the workers
        owl = torch.stack([c[0] for c in chunk])  # type: ignore[index]
        llava = torch.stack([c[1] for c in chunk])  # type: ignore[index]
        return owl.to(fx.device), llava.to(fx.device)
    images: list[torch.Tensor] = chunk  # type: ignore[assignment]
    return fx.owl_norm(images, fx.device), fx.llava_norm(images, fx.device)


def collate_drop_failures(items: list[DecodedImage]) -> ImageBatch:
    """DataLoader collate: keep decoded images (variable sizes, so a list), count failures."""
    batch = ImageBatch(images=[])
    for item in items:
        if item.pixels is None:
            batch.skipped += 1
            batch.errors.append(item.error or "unreadable image")
        else:
            batch.images.append(item.pixels)
    return batch


class _DecodeItems(torch.utils.data.Dataset):
    """Map-style view of a source that decodes in the DataLoader worker."""

    def __init__(self, source: ImageSource, norms: Normalizations | None = None) -> None:
        self.source, self.norms = source, norms

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> DecodedImage:
        try:
            raw = self.source.raw(index)
        except Exception as exc:  # a broken row of a dataset is one skipped image
            return DecodedImage(None, f"item {index}: cannot be read ({exc})")
        return _decode(raw, self.norms)


def _stream_shares(
    stream: Any, image_column: str, batch_size: int, rank: int, world: int, start_step: int
) -> Iterator[list[Any]]:
    """Raw images of this rank's share of every global batch of a stream, from ``start_step``."""
    pending: list[Any] = []
    step = 0
    for row in stream:
        pending.append(row[image_column])
        if len(pending) < batch_size:
            continue
        if step >= start_step:
            yield pending[rank::world]
        pending, step = [], step + 1


def _decode_share(share: list[Any], norms: Normalizations | None) -> ImageBatch:
    return collate_drop_failures([_decode(raw, norms) for raw in share])


def _stream_batches(
    shares: Iterator[list[Any]], norms: Normalizations | None, workers: int
) -> Iterator[ImageBatch]:
    """Decode streamed shares in order, in ``workers`` processes with bounded prefetch.

    The stream itself is read here, in one process (``datasets`` would split a stream between
    DataLoader workers by shard, so the order would depend on the number of workers); only the
    decoding is spread out, so a resumed run sees exactly the same batches.
    """
    if workers == 0:
        for share in shares:
            yield _decode_share(share, norms)
        return
    import collections
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_worker_init,
        initargs=(0,),
    )
    in_flight: collections.deque[Future[ImageBatch]] = collections.deque()
    try:
        for share in shares:
            in_flight.append(pool.submit(_decode_share, share, norms))
            if len(in_flight) >= 4 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# 3. Data order


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


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # legacy tuple form
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_atomically(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``
    (fsynced, ordinary permissions; :func:`jmllm.align.files.atomic_write`)."""
    atomic_write(path, write)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a crash mid-write leaves the old one intact)."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors and plain data only: ``weights_only``)."""
    from jmllm.align.weights import torch_load_tensors

    path = Path(path)
    state = torch_load_tensors(path, "training checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a jmllm-align training checkpoint")
    return state


# ----------------------------------------------------------------------------------------------
# 5. Training


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite weights (a runtime failure: exit code 1)."""


@dataclass
class EvalResult:
    """Held-out metrics: token-wise MSE and mean token cosine similarity."""

    mse: float
    cosine: float
    images: int
    skipped: int = 0


@dataclass
class TrainResult:
    """What a :func:`train` call did."""

    weights_path: Path | None  # None when interrupted before the end
    checkpoint_path: Path
    steps: int
    images_seen: int
    images_skipped: int
    final_loss: float | None
    eval: EvalResult | None
    train_seconds: float  # the training loop only (no model loading)
    images_per_s: float  # images trained per second of train_seconds (this session)
    interrupted: bool = False
    initial_eval: EvalResult | None = None  # held-out metrics of the untrained W (step 0)
    layer: AlignmentLayer | None = field(default=None, repr=False)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_hint: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    info = _Dist(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device_hint != "cpu"
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
        info.initialised_here = True
    return info


def _resolve_device(config: TrainConfig, info: _Dist) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _all_sum(values: list[float], info: _Dist, device: torch.device) -> list[float]:
    if info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _micro_batches(images: list[Pixels], size: int | None) -> list[list[Pixels]]:
    size = size or max(len(images), 1)
    return [images[i : i + size] for i in range(0, len(images), size)]


def _token_errors(
    model: torch.nn.Module, fx: FeatureExtractor, images: list[Pixels], drop_cls: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W against LLaVA's own tokens: per-token squared error (B, N), prediction and target."""
    with torch.no_grad():
        owl_pixels, llava_pixels = _model_inputs(fx, images)  # (B, 3, S, S) each
        source = owl_penultimate(fx.owl, owl_pixels)  # (B, 1 + N, D_owl), frozen teacher side
        source = source[:, 1:] if drop_cls else source  # (B, N, D_owl)
        target = llava_image_tokens(fx.llava, llava_pixels).float()  # (B, N, D_llm)
    prediction = model(source).float()  # (B, N, D_llm)
    return (prediction - target).pow(2).mean(dim=-1), prediction, target  # (B, N) per-token MSE


@torch.no_grad()
def evaluate(
    layer: AlignmentLayer,
    fx: FeatureExtractor,
    images: list[Pixels],
    *,
    micro_batch_size: int = 16,
    autocast: bool = False,
    skipped: int = 0,
    info: _Dist | None = None,
) -> EvalResult:
    """Held-out token-wise MSE and mean token cosine similarity of W on decoded images.

    Under ``torchrun`` every rank passes its share; the sums are reduced over ranks.

    Example:
        >>> evaluate(layer, fx, [image_to_tensor(load_image("a.jpg"))])  # doctest: +SKIP
        EvalResult(mse=0.41, cosine=0.62, images=1, skipped=0)
    """
    info = info or _Dist()
    was_training = layer.training
    layer.eval()
    sse = cos = tokens = 0.0
    device = fx.device
    for chunk in _micro_batches(images, micro_batch_size):
        if not chunk:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            errors, prediction, target = _token_errors(layer, fx, chunk, layer.config.drop_cls)
        sse += errors.sum().item()
        cos += torch.nn.functional.cosine_similarity(prediction, target, dim=-1).sum().item()
        tokens += target.shape[0] * target.shape[1]
    layer.train(was_training)
    sse, cos, tokens, n, bad = _all_sum(
        [sse, cos, tokens, float(len(images)), float(skipped)], info, device
    )
    if tokens == 0:
        return EvalResult(mse=math.nan, cosine=math.nan, images=0, skipped=int(bad))
    return EvalResult(mse=sse / tokens, cosine=cos / tokens, images=int(n), skipped=int(bad))


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("signal %d: stopping after this step and writing a checkpoint", signum)
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    for name, value in config.to_dict().items():
        if name in TrainConfig.RESUMABLE_CHANGES:
            continue
        if saved.get(name) != value:
            raise ValueError(
                f"{path}: cannot resume with {name}={value!r}; the checkpoint was trained with "
                f"{name}={saved.get(name)!r} (start a new --out folder to change it)"
            )


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics rows written after the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a row cut short by the kill
    text = "".join(line + "\n" for line in keep)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    feature_extractor: FeatureExtractor | None = None,
) -> TrainResult:
    """Train W between the two frozen encoders of ``config`` and save it in ``out_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (one JSON object per logged step and evaluation),
    ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and, when training
    finishes (end of data or ``max_steps``), ``alignment.safetensors`` with provenance. Under
    ``torchrun`` each process trains on its shard of every global batch (DDP); rank 0 writes.
    SIGTERM/SIGINT make it checkpoint at the next step and return with ``interrupted=True``.

    Args:
        config: the run's settings (see :func:`load_preset`).
        out_dir: the run's folder.
        resume: continue from ``out_dir/checkpoint.pt`` (exactly: same data order, same weights
            as if never interrupted). Only bookkeeping fields may change on resume.
        feature_extractor: already-loaded encoders (default: loaded from the config's ids).

    Returns:
        A :class:`TrainResult`.

    Example:
        >>> result = train(load_preset("tiny").replace(images=["imgs/"]), "runs/t")  # doctest: +SKIP
        >>> result.images_skipped  # doctest: +SKIP
        0
    """
    out = Path(out_dir)
    info = _setup_distributed(config.device)
    try:
        return _train(config, out, resume, feature_extractor, info)
    finally:
        if info.initialised_here:
            dist.destroy_process_group()


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run trains in bfloat16 (encoders in bf16, W's forward under autocast).

    Example:
        >>> uses_bf16("fp32", torch.device("cuda")), uses_bf16("auto", torch.device("cuda"))
        (False, True)
    """
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _train(
    config: TrainConfig,
    out: Path,
    resume: bool,
    fx: FeatureExtractor | None,
    info: _Dist,
) -> TrainResult:
    device = _resolve_device(config, info)
    bf16 = uses_bf16(config.precision, device)
    checkpoint_path, metrics_path = out / CHECKPOINT_NAME, out / METRICS_NAME
    if config.batch_size < info.world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than {info.world} processes")

    # -- resume state
    state: dict[str, Any] | None = None
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        _check_resumable(state["config"], config, checkpoint_path)
    elif resume:
        logger.info("%s: no checkpoint, starting from scratch", checkpoint_path)

    # -- data: sources, held-out subset and training items
    stream = None
    if config.dataset:
        loaded = _load_dataset(config)
        if config.dataset_streaming:
            stream = _undecoded_column(loaded, config.image_column)
            held_raw = [row[config.image_column] for row in stream.take(config.eval_images)]
            held_out_items: list[Any] = held_raw[info.rank :: info.world]
            stream = stream.skip(config.eval_images)
            source: ImageSource | None = None
            train_ids: list[int] = []
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

    # -- models
    if fx is None:
        dtype = torch.bfloat16 if bf16 else torch.float32
        fx = FeatureExtractor.from_pretrained(
            config.source_model, config.target_model, dtype=dtype, device=device
        )
    overrides = {
        k: getattr(config, k)
        for k in ("hidden_dim", "num_hidden_layers", "num_heads")
        if getattr(config, k) is not None
    }
    align_config = alignment_config_for(
        fx.owl.config,
        fx.llava.config,
        config.architecture,
        source_model=config.source_model,
        target_model=config.target_model,
        **overrides,
    )
    torch.manual_seed(config.seed)
    layer = AlignmentLayer(align_config).to(device)
    optimizer = torch.optim.AdamW(
        layer.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=config.betas,
        fused=device.type == "cuda",
    )
    epoch = step_in_epoch = step = images_seen = images_skipped = 0
    last_loss: float | None = None
    initial_eval: EvalResult | None = None
    if state is not None:
        layer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        step, images_seen, images_skipped = (
            state["step"],
            state["images_seen"],
            state["images_skipped"],
        )
        last_loss = state["last_loss"]
        if state.get("initial_eval"):
            initial_eval = EvalResult(**state["initial_eval"])
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (epoch %d)", checkpoint_path, step, epoch)
    model: torch.nn.Module = layer
    if info.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            layer, device_ids=[device.index] if device.type == "cuda" else None
        )

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config.to_dict(), indent=2)
        write_atomically(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        if state is not None:
            _truncate_metrics(metrics_path, step)
        elif metrics_path.exists():
            metrics_path.unlink()

    # -- held-out images: decoded once, kept as uint8 (this rank's share)
    held_batch = _decode_all(
        [source.raw(i) for i in held_out_items] if source is not None else held_out_items
    )
    micro = config.micro_batch_size or max(1, math.ceil(config.batch_size / info.world))

    def run_eval() -> EvalResult:
        result = evaluate(
            layer,
            fx,
            held_batch.images,
            micro_batch_size=micro,
            autocast=bf16,
            skipped=held_batch.skipped,
            info=info,
        )
        if info.main:
            _append_jsonl(
                metrics_path,
                {
                    "step": step,
                    "eval_mse": result.mse,
                    "eval_cosine": result.cosine,
                    "eval_images": result.images,
                    "eval_skipped": result.skipped,
                },
            )
        return result

    def write_checkpoint() -> None:
        if not info.main:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "config": config.to_dict(),
                "alignment_config": align_config.to_dict(),
                "model": layer.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "step": step,
                "images_seen": images_seen,
                "images_skipped": images_skipped,
                "last_loss": last_loss,
                "initial_eval": dataclasses.asdict(initial_eval) if initial_eval else None,
                "rng": _rng_state(),
            },
        )

    # -- the loop
    in_workers = config.preprocess == "workers" or (
        config.preprocess == "auto" and device.type != "cuda"
    )
    norms: Normalizations | None = (fx.owl_norm, fx.llava_norm) if in_workers else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        disable=not (info.main and config.progress),
        dynamic_ncols=True,
    )
    last_eval: EvalResult | None = None
    interrupted = finished = False
    step_sse: torch.Tensor | None = None
    step_tokens = 0.0
    if state is None and config.eval_images > 0:
        initial_eval = run_eval()  # the untrained W: the baseline the final eval is read against
    window_images, window_start = 0, time.perf_counter()
    loop_start, session_images = time.perf_counter(), 0
    layer.train()
    with _StopFlag() as stop:
        while epoch < config.epochs and not finished:
            if total_steps is not None and step >= total_steps:
                break
            loader = _epoch_loader(
                config, source, train_ids, stream, epoch, step_in_epoch, info, norms
            )
            for batch in loader:
                # One optimizer step. Counts first (all ranks), so the loss is the mean over
                # every valid token of the global batch whatever each rank kept; the same
                # all-reduce carries the stop votes (SIGTERM), so ranks stop at the same step.
                n_images, n_skipped, stop_votes = _all_sum(
                    [float(len(batch.images)), float(batch.skipped), float(stop.requested)],
                    info,
                    device,
                )
                if stop_votes > 0:  # this step is not trained: the data position stays before it
                    interrupted = True
                    break
                for error in batch.errors:
                    logger.warning("skipped image: %s", error)
                tokens = n_images * align_config.num_tokens
                # A rank that kept no image still runs one empty micro-batch to join DDP.
                chunks = _micro_batches(batch.images, config.micro_batch_size) or [[]]
                step_sse = torch.zeros((), device=device)  # summed on the device: no host sync
                for i, chunk in enumerate(chunks):
                    sync = i == len(chunks) - 1
                    # DDP: all-reduce gradients only on the last micro-batch of the step.
                    ctx = (
                        _no_sync(model)
                        if (info.world > 1 and not sync)
                        else contextlib.nullcontext()
                    )
                    with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        if chunk:
                            errors, _, _ = _token_errors(model, fx, chunk, align_config.drop_cls)
                        else:  # nothing decoded on this rank: still join DDP's all-reduce
                            empty = torch.zeros(
                                0, align_config.num_tokens, align_config.in_dim, device=device
                            )
                            errors = model(empty).float().pow(2).mean(dim=-1)
                        local_sse = errors.sum()
                    if tokens > 0:
                        # DDP averages gradients over ranks; scaling by world makes it a sum.
                        (local_sse * (info.world / tokens)).backward()
                    step_sse += local_sse.detach()
                if tokens > 0:
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(layer.parameters(), config.grad_clip)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_tokens = tokens
                step += 1
                step_in_epoch += 1
                images_seen += int(n_images)
                images_skipped += int(n_skipped)
                session_images += int(n_images)
                window_images += int(n_images)
                bar.update(1)
                log_now = bool(config.log_every) and step % config.log_every == 0
                checkpoint_now = (
                    bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                )
                if log_now or checkpoint_now:  # the loss is read (a host sync) only when needed
                    last_loss = _global_loss(step_sse, step_tokens, last_loss, info, device)
                if log_now:
                    now = time.perf_counter()
                    rate = window_images / max(now - window_start, 1e-9)
                    window_images, window_start = 0, now
                    bar.set_postfix(loss=f"{last_loss:.4g}", img_s=f"{rate:.1f}")
                    if info.main:
                        _append_jsonl(
                            metrics_path,
                            {
                                "step": step,
                                "epoch": epoch,
                                "loss": last_loss,
                                "images_seen": images_seen,
                                "images_skipped": images_skipped,
                                "images_per_s": rate,
                                "lr": optimizer.param_groups[0]["lr"],
                            },
                        )
                if config.eval_images and config.eval_every and step % config.eval_every == 0:
                    last_eval = run_eval()
                if checkpoint_now:
                    write_checkpoint()
                if total_steps is not None and step >= total_steps:
                    finished = True
                    break
            if interrupted:
                break
            if not finished:
                epoch, step_in_epoch = epoch + 1, 0
    if step_sse is not None:  # the loss of the last step trained in this session
        last_loss = _global_loss(step_sse, step_tokens, last_loss, info, device)
    train_seconds = time.perf_counter() - loop_start
    bar.close()
    write_checkpoint()
    result = TrainResult(
        weights_path=None,
        checkpoint_path=checkpoint_path,
        steps=step,
        images_seen=images_seen,
        images_skipped=images_skipped,
        final_loss=last_loss,
        eval=None,
        train_seconds=train_seconds,
        images_per_s=session_images / max(train_seconds, 1e-9),
        interrupted=interrupted,
        initial_eval=initial_eval,
        layer=layer,
    )
    if interrupted:
        logger.info("interrupted at step %d; resume with --resume", step)
        return result
    if config.eval_images > 0:
        evaluated_now = last_eval and config.eval_every and step % config.eval_every == 0
        result.eval = last_eval if evaluated_now else run_eval()
    if not all(bool(torch.isfinite(p).all()) for p in layer.parameters()):
        raise TrainingDivergedError(
            f"training diverged: W holds NaN or infinite weights after step {step} (last loss "
            f"{last_loss}); no weights written; lower lr or set grad_clip and start again"
        )
    if info.main:
        provenance = {
            "trainer": "jmllm-align train",
            "steps": step,
            "images_seen": images_seen,
            "images_skipped": images_skipped,
            "final_loss": last_loss,
            "eval_mse": result.eval.mse if result.eval else None,
            "eval_cosine": result.eval.cosine if result.eval else None,
            "eval_images": result.eval.images if result.eval else 0,
            "eval_mse_initial": initial_eval.mse if initial_eval else None,
            "source_model": config.source_model,
            "target_model": config.target_model,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "seed": config.seed,
            "world_size": info.world,
        }
        result.weights_path = save_alignment(layer, out / WEIGHTS_NAME, provenance)
    if images_skipped or held_batch.skipped:
        logger.warning(
            "skipped %d unreadable training image(s) and %d held-out image(s)",
            images_skipped,
            held_batch.skipped,
        )
    return result


def _global_loss(
    step_sse: torch.Tensor, tokens: float, previous: float | None, info: _Dist, device: torch.device
) -> float | None:
    """The mean squared error of one step over every rank's tokens (None before any token)."""
    (total,) = _all_sum([float(step_sse.item())], info, device)
    return total / tokens if tokens > 0 else previous


def _no_sync(model: Any) -> Any:
    return model.no_sync()


def _decode_all(raws: list[Any]) -> ImageBatch:
    return collate_drop_failures([_decode(raw) for raw in raws])


def _epoch_loader(
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
        return _stream_batches(stream_shares, norms, workers)
    order = epoch_order(train_ids, config.seed, epoch)
    shares = rank_shares(order, config.batch_size, info.rank, info.world, start_step)
    return DataLoader(
        _DecodeItems(source, norms),
        batch_sampler=shares,
        collate_fn=collate_drop_failures,
        **common,
    )


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding is per-image; threads would only fight each other
