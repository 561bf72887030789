"""The KD objective as one module, and its DDP / FSDP2 wrapping.

    kd_module = KDModule(objective, student, teacher, shard_teacher=False)
    model = wrap(kd_module, mode="fsdp", reduce_dtype=torch.float32, device="cpu")
    loss, ce, kd, tokens = model(ids)                 # token means; model(ids, normalizer=N): token sums / N

Why one module: FSDP2 (`fully_shard`) keeps each parameter as a 1/world shard and all-gathers
it only for the forward (and backward) of the module that owns it. The fused-linear KD loss
reads the student's output matrix directly (it never asks the model for logits), so the loss
must be computed *inside* the wrapped module's forward, where that matrix is whole, and its
gradient must land on the unsharded parameter so FSDP's reduce-scatter picks it up. Each
decoder layer is its own FSDP unit (all-gathered one at a time); the embeddings, final norm
and output matrix (tied or not) form the root unit.

The frozen teacher is either kept out of the module tree (`replicate`: a full copy per rank,
never wrapped, never all-reduced) or registered under the root and sharded like the student
(`shard`: a teacher bigger than one GPU's share), without gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Mode = Literal["ddp", "fsdp"]


class KDModule(nn.Module):
    """forward(ids) -> (loss, ce, kd, tokens) of kd.train.objectives' objective, computed inside the module."""

    def __init__(self, objective, student: nn.Module, teacher: nn.Module | None, *, shard_teacher: bool):
        super().__init__()
        self.student = student
        if teacher is None:  # offline teacher (a logits cache): nothing to hold
            pass
        elif shard_teacher:
            self.teacher = teacher
        else:
            self._replicated_teacher = (teacher,)  # a tuple hides it from nn.Module registration
        self.objective = objective

    def forward(self, ids, normalizer: float | None = None, prepare: bool = False):
        """`prepare=True` (under no_grad): the objective's batch preparation only (on-policy: the draw and the
        generation), run here so FSDP2 has gathered the root unit the generating student reads."""
        if prepare:
            return self.objective.prepare(ids) if hasattr(self.objective, "prepare") else ids
        out = self.objective(ids, normalizer=normalizer)
        tokens = torch.tensor(float(out.tokens), dtype=torch.float64, device=out.loss.device)
        return out.loss, out.ce, out.kd, tokens


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works under FSDP2)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a causal LM (the FSDP units)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to shard")
    return list(layers)


def wrap(kd_module: KDModule, *, mode: Mode, reduce_dtype: torch.dtype, device: str,
         shard_teacher: bool = False) -> nn.Module:
    """DDP or FSDP2 around `kd_module` (already on `device`). Returns the module to call."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(kd_module, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
        if reduce_dtype == torch.bfloat16:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return ddp
    if mode != "fsdp":
        raise ValueError(f"unknown distributed mode {mode!r}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    for layer in decoder_layers(kd_module.student):
        fully_shard(layer, mp_policy=mp)
    if shard_teacher:
        for layer in decoder_layers(kd_module.teacher):
            fully_shard(layer, mp_policy=mp)
    # The root unit: embeddings, final norm, output matrix. Kept unsharded after forward
    # since backward needs it at once.
    fully_shard(kd_module, mp_policy=mp, reshard_after_forward=False)
    return kd_module


def student_of(model: nn.Module) -> nn.Module:
    """The student inside a wrapped KDModule (DDP keeps it under `.module`)."""
    return getattr(model, "module", model).student


def no_sync(model: nn.Module, sync: bool):
    """Context for a micro-batch: skip the gradient all-reduce / reduce-scatter unless `sync`."""
    import contextlib

    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
