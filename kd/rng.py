"""A training run's own random stream, so runs sharing a process never share torch's generator.

    rng = RunRNG(seed, student, device="cpu", checkpointing=False)
    with rng.scope():                      # around each micro-batch's forward + backward
        loss = objective(batch); loss.backward()
    state["rng"]["run"] = rng.state_dict()  # in the checkpoint; rng.load_state_dict(...) on resume

Why: a sweep's concurrent trials are threads of one process, and torch's default generators are
process-wide. Where kdflow draws on purpose it passes its own `torch.Generator` (data order:
kd/data/prepared.py; on-policy sampling: kd/train/on_policy/generation.py), so those draws depend only on
(seed, step, micro-batch, rank). What cannot take a generator is a model's dropout in train mode (and
activation checkpointing, whose backward sets the process generator to replay it): such a run keeps its
own generator state here and `scope()` swaps it in, under PROCESS_RNG_LOCK, for the micro-batch, and
saves it back after. Runs whose model draws nothing (no dropout, no checkpointing: every kdflow preset)
never take the lock, so they still train in parallel; runs with dropout train one micro-batch at a time.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from kd.model_build_lock import MODEL_BUILD_LOCK

# The same re-entrant lock as model builds: building a model initialises weights from the process
# generator, which must not happen while another run has its own state swapped in.
PROCESS_RNG_LOCK = MODEL_BUILD_LOCK


def _config_dropouts(config, seen=None) -> list[float]:
    """Every numeric *dropout* / *drop_path* value of a transformers config (nested configs included)."""
    if config is None:
        return []
    seen = seen if seen is not None else set()
    if id(config) in seen:
        return []
    seen.add(id(config))
    values = []
    items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
    for key, value in items:
        if isinstance(value, dict):
            values += _config_dropouts(value, seen)
        elif isinstance(key, str) and ("dropout" in key or "drop_path" in key) \
                and isinstance(value, numbers.Real) and not isinstance(value, bool):
            values.append(float(value))
    return values


def draws_in_training(model: torch.nn.Module) -> bool:
    """True when `model`'s forward in train mode draws from torch's process generator (dropout)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    # attention dropout is a config value the attention function reads, not a module
    return any(v > 0 for v in _config_dropouts(getattr(model, "config", None)))


def _device_index(device: str) -> int | None:
    d = torch.device(device)
    return (d.index if d.index is not None else torch.cuda.current_device()) if d.type == "cuda" else None


class RunRNG:
    """The process generator's state as this run alone would have it (CPU, and its CUDA device)."""

    def __init__(self, seed: int, model: torch.nn.Module, *, device: str = "cpu", checkpointing: bool = False):
        self.cuda = _device_index(device)
        self.needed = checkpointing or draws_in_training(model)
        cpu = torch.Generator().manual_seed(seed)  # the state torch.manual_seed(seed) gives
        self.cpu_state = cpu.get_state()
        self.cuda_state = None
        if self.cuda is not None:
            gen = torch.Generator(device=f"cuda:{self.cuda}").manual_seed(seed)
            self.cuda_state = gen.get_state()

    @contextlib.contextmanager
    def scope(self):
        """Draws inside come from (and advance) this run's stream; the process generator is left as it was."""
        if not self.needed:
            yield
            return
        with PROCESS_RNG_LOCK:
            saved_cpu = torch.get_rng_state()
            saved_cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
            torch.set_rng_state(self.cpu_state)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.cuda)
            try:
                yield
            finally:
                self.cpu_state = torch.get_rng_state()
                torch.set_rng_state(saved_cpu)
                if self.cuda is not None:
                    self.cuda_state = torch.cuda.get_rng_state(self.cuda)
                    torch.cuda.set_rng_state(saved_cuda, self.cuda)

    def state_dict(self) -> dict:
        state = {"cpu": self.cpu_state.clone()}
        if self.cuda_state is not None:
            state["cuda"] = self.cuda_state.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.cpu_state = state["cpu"].clone()
        if self.cuda is not None and "cuda" in state:
            self.cuda_state = state["cuda"].clone()
