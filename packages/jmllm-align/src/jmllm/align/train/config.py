"""The run's settings: :class:`TrainConfig` (every field checked on construction) and presets.

Presets are JSON files of fields (``presets/*.json``: ``paper``, ``tiny``, ...); the file names a
run writes into its folder are defined here too, so every part of the trainer agrees on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from jmllm.align.architectures import ARCHITECTURES
from jmllm.align.options import check_finite
from jmllm.align.preprocessing import PREPROCESSINGS

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "alignment.safetensors"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in checkpoints and ``config.json``)."""

    # The two frozen encoders: Hub ids or local folders.
    source_model: str = "google/owlvit-base-patch32"  # OWL-ViT: gives t
    # the multi-modal LLM (any supported family): gives the target vision tokens
    target_model: str = "llava-hf/llava-1.5-7b-hf"
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
    # How images become the encoders' inputs (jmllm.align.preprocessing): "exif" (EXIF
    # orientation applied, torch's antialiased resize) or "authors" (the paper preset: stored
    # pixels and the Hugging Face processors' PIL resize, as the authors' trainer fed them).
    preprocessing: str = "exif"
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
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"preprocessing must be {' or '.join(sorted(PREPROCESSINGS))}, "
                f"got {self.preprocessing!r}"
            )

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
    "preprocessing": "required",
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
