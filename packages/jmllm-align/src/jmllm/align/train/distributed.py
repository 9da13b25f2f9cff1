"""Distributed set-up under ``torchrun``: rank and world size, the device, sums over ranks.

One process per device; every rank trains on its share of each global batch (DDP). Outside
``torchrun`` (``WORLD_SIZE`` unset or 1) all of this reduces to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from jmllm.align.train.config import TrainConfig


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


def _no_sync(model: Any) -> Any:
    return model.no_sync()
