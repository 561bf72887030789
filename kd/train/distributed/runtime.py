"""Process-group set-up from the environment torchrun gives every rank.

    with process_group(timeout_s=1800) as dist_env:   # dist_env.rank, .world_size, .device
        ...

gloo on CPU (the CI path), nccl when CUDA is there (one GPU per local rank). The timeout bounds
every collective: a rank that dies or hangs makes the others fail after `timeout_s` rather than
wait for ever (torchrun then stops the job and the launcher reports it).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:<local_rank>"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_for(local_rank: int, want: str) -> str:
    """cuda:<local_rank> when CUDA is asked for (or auto and present), else cpu."""
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return f"cuda:{local_rank}"
    return "cpu"


@contextmanager
def process_group(*, timeout_s: float, device_pref: str = "auto") -> Iterator[DistEnv]:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the env)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(local_rank, device_pref)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend, timeout=dt.timedelta(seconds=timeout_s),
                            device_id=torch.device(device) if backend == "nccl" else None)
    try:
        yield DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
    finally:
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum a few floats over all ranks in one collective (float64, so 1e-4 comparisons hold)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
