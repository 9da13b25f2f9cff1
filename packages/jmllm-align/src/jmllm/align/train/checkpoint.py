"""Resumable state: RNG states, atomic checkpoints, the resume check and the metrics file.

Resuming from a checkpoint gives bit-identical weights to a run that was never interrupted: the
checkpoint holds W, the optimizer, the data position and every random generator's state.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jmllm.align.files import atomic_write, open_nofollow
from jmllm.align.train.config import TrainConfig

CHECKPOINT_FORMAT = "jmllm-align-checkpoint"


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
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # never through a link
    with os.fdopen(fd, "a", encoding="utf-8") as f:
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
        except (json.JSONDecodeError, RecursionError, AttributeError):
            continue  # a row cut short by the kill (or not a metrics row at all)
    text = "".join(line + "\n" for line in keep)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
