"""One rule for the loss of an optimizer step, used by both training loops (issue 31).

    step = run_step(batches, forward=lambda b, n: ..., prepare=..., world_size=W, reduce_sum=..., sync=...)
    step.loss, step.ce, step.kd      # the step's per-token means: the numbers metrics.jsonl logs
    step.tokens                      # trained tokens of the whole step (all micro-batches, all ranks)

The rule: every trained token of a step (label != -100: the CE, the KD term and the on-policy divergence
are all counted over the same tokens) weighs the same, 1/N, where N is the number of trained tokens in
the whole step: every micro-batch of the accumulation and every rank. The step's loss is the sum over
its tokens / N, its gradient that loss's gradient, and the logged loss is that same number. So one
global batch gives one gradient however it is split into micro-batches and ranks (1 x 4, 2 x 2 with
accumulation, 4 x 1, 2 ranks x 2 ...). The older rule, a mean of micro-batch means, gave a token in a
short micro-batch (a chat block with few assistant tokens, an on-policy completion that stopped early)
more weight than one in a long micro-batch. Transformers (late 2024) and TRL's distillation trainers
(normalize by the global number of tokens) made the same fix.

Per token rather than per sequence: the objective is a per-token one (Hinton's KD and GKD's divergences
are sums over next-token distributions), and a per-token mean is what eval's held-out loss, perplexity
and KL report, so the training loss and the eval numbers mean the same thing; a per-sequence mean would
also make one long answer weigh as much as one short reply, and its value would depend on how the
packer cuts documents into blocks.

N is known before any backward pass: a pre-pass prepares every micro-batch of the step (on-policy:
draws its kind and generates its completions, see kd/train/objectives.py), counts its labels and,
across ranks, all-reduces the count; then each micro-batch's loss is its token sum / N (the losses take
`normalizer=N`, kd/train/losses.py), and their sum over micro-batches and ranks is the step's loss. Generated
batches are completed before the first backward: the student's weights do not change within a step and
the draws are seeded by (step, micro-batch, rank), so the samples are those the interleaved order gave,
and the completions are token ids (a few KB to hold), while scaling the gradients afterwards instead
would have to touch DDP / FSDP2's reduced gradients and every metric after the fact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kd.data.prepared import IGNORE

NORMALIZATION = "per-token, global step"  # recorded in the manifest (training.loss_normalization)


def trained_tokens(batch) -> int:
    """Tokens of a micro-batch that carry the loss: labels != -100 (a bare (B, L) id tensor: all B * (L-1))."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0] * max(batch.shape[1] - 1, 0))
    return int((batch.labels != IGNORE).sum())


@dataclass(frozen=True)
class StepLoss:
    """One optimizer step's per-token means (over `tokens`, every micro-batch and rank) and its token count."""

    loss: float
    ce: float
    kd: float
    tokens: int


Forward = Callable[[object, float], tuple]  # (micro-batch, normalizer) -> (loss, ce, kd); loss differentiable


def run_step(batches: Sequence, *, forward: Forward, prepare: Callable[[int, object], object] | None = None,
             world_size: int = 1, reduce_sum: Callable[[list[float]], list[float]] | None = None,
             sync: Callable[[bool], contextlib.AbstractContextManager] | None = None) -> StepLoss:
    """Forward + backward of one step's micro-batches under the per-token, global-step rule.

    `batches`: this rank's micro-batches in order. `prepare(micro, batch)`: the batch to train (on-policy:
    generated), run for every micro-batch before any backward. `forward(batch, normalizer)`: the losses
    of a batch as token sums / normalizer. `world_size` / `reduce_sum` (sum floats over ranks) /
    `sync(last)` (DDP no_sync or FSDP2 gradient sync, a context): a distributed run, whose wrapper averages
    gradients over ranks, so each rank backpropagates world_size x its share. Gradients accumulate into
    the parameters' .grad as usual; the caller zeroes them before and steps the optimizer after."""
    ready = [prepare(micro, b) for micro, b in enumerate(batches)] if prepare is not None else list(batches)
    local = float(sum(trained_tokens(b) for b in ready))
    total = int(reduce_sum([local])[0]) if reduce_sum is not None else int(local)
    normalizer = float(max(total, 1))  # an all-masked step: loss 0, zero gradients
    sums = [0.0, 0.0, 0.0]
    for micro, b in enumerate(ready):
        with sync(micro == len(ready) - 1) if sync is not None else contextlib.nullcontext():
            loss, ce, kd = forward(b, normalizer)[:3]
            (loss * world_size if world_size != 1 else loss).backward()
        sums[0] += float(loss.detach())
        sums[1] += float(ce)
        sums[2] += float(kd)
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    return StepLoss(loss=sums[0], ce=sums[1], kd=sums[2], tokens=total)
