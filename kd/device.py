"""Where a step runs: (device, weight dtype, bf16 autocast) from `train.device` / `train.dtype`.

    device, dtype, autocast = resolve_device(cfg)     # ("cpu", torch.float32, False) on a machine without CUDA

Training, the teacher cache and evaluation all run their models where this says.
"""

from __future__ import annotations

import torch

from kd.config import RunConfig
from kd.errors import ConfigError


def resolve_device(cfg: RunConfig) -> tuple[str, torch.dtype, bool]:
    """(device, weight dtype, use bf16 autocast) from train.device / train.dtype."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    # bf16 autocast runs on CPU too (slower there, but CI exercises the bf16 code paths); auto = CUDA only
    autocast = cfg.train.dtype == "bfloat16" or (device == "cuda" and cfg.train.dtype == "auto")
    weights = torch.bfloat16 if cfg.train.param_dtype == "bfloat16" else torch.float32  # train.param_dtype
    return device, weights, autocast
