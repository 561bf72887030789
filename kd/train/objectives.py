"""The objectives: what one training step asks of the teacher, as one protocol for both loops.

    objective = make_objective(cfg, student, teacher, offline, alignment, autocast=False, device="cpu")
    objective = on_policy_objective(cfg, objective, student, teacher, alignment, packed, student_dir, ...)
    out = objective(batch, normalizer=n_tokens)      # a kd.train.losses.KDLossOutput: .loss .ce .kd .tokens

An `Objective` maps a micro-batch to the KD loss through the fused-linear losses (kd/train/losses.py),
never materialising [tokens, vocab] logits:
    OnlineObjective    the frozen teacher in memory runs on every batch (kd.teacher_mode: online); without a
                       teacher (alpha = 1, fine-tuning only) the student stands in for it at weight 0
    OfflineObjective   the teacher's cached top-k (kd.teacher_mode: offline, kd/teacher_cache/): no teacher
                       in memory; `open_teacher_cache` gives the verified reader bound to the training data
    OnPolicyObjective  GKD around either of them (kd.on_policy, kd/train/on_policy/objective.py): per
                       micro-batch the student (or the teacher) generates the completions that are trained
The single-process loop (kd/train/loop.py) and the torch.distributed loop (kd/train/distributed/loop.py)
build them with the same calls here.
"""

from __future__ import annotations

from typing import Protocol

import torch

from backends import get_backend
from kd.config import RunConfig
from kd.data import Batch
from kd.errors import ConfigError
from kd.results import TeacherCacheResult, VocabAlignment
from kd.train.losses import KDLossOutput, fused_linear_kd_loss, fused_linear_sparse_kd_loss


class Objective(Protocol):
    """A batch (a kd.data `Batch`, or bare (B, L) ids: every next token a label) -> the KD loss: token means,
    or token sums / `normalizer` (the step's trained tokens, kd/train/loss_normalization.py)."""

    def __call__(self, batch: Batch | torch.Tensor, normalizer: float | None = None) -> KDLossOutput: ...


def open_teacher_cache(cfg: RunConfig, teacher_cache: TeacherCacheResult | None, packed):
    """kd.teacher_mode=offline: the cache's verified reader, bound to the training split; online: None."""
    if cfg.kd.teacher_mode != "offline":
        return None
    if teacher_cache is None:
        raise ConfigError("kd.teacher_mode: offline needs the cache_teacher_logits step's result (none was given)")
    from kd.teacher_cache.step import open_for_training

    return open_for_training(cfg, teacher_cache, packed)


def make_objective(cfg: RunConfig, student, teacher, offline, alignment: VocabAlignment, *, autocast: bool,
                   device: str) -> Objective:
    """`offline` (open_teacher_cache's reader) -> OfflineObjective; else OnlineObjective with `teacher`
    (None: fine-tuning only)."""
    if offline is None:
        return OnlineObjective(cfg, student, teacher, alignment, autocast, device)
    return OfflineObjective(cfg, student, offline, alignment, autocast, device)


class OnlineObjective:
    """Student + frozen teacher -> KD loss on one batch, through the fused-linear loss. Without a teacher
    (fine_tuning_only) the student stands in for it: D(p, p) = 0 at weight 0, the loss is the CE alone."""

    def __init__(self, cfg: RunConfig, student, teacher, alignment: VocabAlignment, autocast: bool, device: str):
        self.cfg, self.student, self.teacher = cfg, student, teacher
        self.alignment, self.autocast, self.device = alignment, autocast, device
        self.backend = get_backend("hf")

    def __call__(self, batch: Batch | torch.Tensor, normalizer: float | None = None):
        """KD loss of `batch`: token means, or token sums / `normalizer` (the step's trained tokens)."""
        kd = self.cfg.kd
        if not isinstance(batch, Batch):  # bare (B, L) ids: every next token is a label
            batch = Batch(batch, batch[:, 1:], None)
        ids, pos = batch.ids.to(self.device), None if batch.position_ids is None else batch.position_ids.to(self.device)
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast):
            s_hidden = self.backend.hidden_states(self.student, ids, position_ids=pos)[:, :-1]
            with torch.no_grad():  # not inference_mode: its tensors cannot be saved for backward
                t_hidden = (s_hidden.detach() if self.teacher is None else
                            self.backend.hidden_states(self.teacher, ids, position_ids=pos)[:, :-1])
        s_w, s_b = self.backend.output_head(self.student)
        t_w, t_b = (s_w, s_b) if self.teacher is None else self.backend.output_head(self.teacher)
        return fused_linear_kd_loss(
            s_hidden.reshape(-1, s_hidden.shape[-1]), s_w,
            t_hidden.reshape(-1, t_hidden.shape[-1]), t_w[: self.alignment.rows_kept].detach(),
            batch.labels.to(self.device).reshape(-1),  # -100: masked (prompt, padding) for CE and KD alike
            alpha=kd.alpha, temperature=kd.temperature, divergence=kd.divergence, beta=kd.jsd_beta,
            valid_vocab=self.alignment.valid_vocab, chunk_size=kd.chunk_size,
            student_bias=s_b, teacher_bias=None if t_b is None else t_b[: self.alignment.rows_kept].detach(),
            normalizer=normalizer,
        )


class OfflineObjective:
    """Student + the teacher's cached top-k (kd.teacher_mode=offline) -> sparse KD loss; no teacher in memory."""

    def __init__(self, cfg: RunConfig, student, reader, alignment: VocabAlignment, autocast: bool, device: str):
        self.cfg, self.student, self.reader = cfg, student, reader
        self.alignment, self.autocast, self.device = alignment, autocast, device
        self.backend = get_backend("hf")

    def __call__(self, batch: Batch | torch.Tensor, normalizer: float | None = None):
        """KD loss of `batch`: token means, or token sums / `normalizer` (the step's trained tokens)."""
        kd = self.cfg.kd
        if not isinstance(batch, Batch):
            batch = Batch(batch, batch[:, 1:], None)
        t_ids, t_lp, t_tail = (x.to(self.device) for x in self.reader.targets(batch.ids, batch.position_ids))
        ids, pos = batch.ids.to(self.device), None if batch.position_ids is None else batch.position_ids.to(self.device)
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.autocast):
            s_hidden = self.backend.hidden_states(self.student, ids, position_ids=pos)[:, :-1]
        s_w, s_b = self.backend.output_head(self.student)
        return fused_linear_sparse_kd_loss(
            s_hidden.reshape(-1, s_hidden.shape[-1]), s_w, t_ids, t_lp, t_tail,
            batch.labels.to(self.device).reshape(-1),
            alpha=kd.alpha, temperature=kd.temperature, cache_temperature=self.reader.cache_temperature,
            divergence=kd.divergence, beta=kd.jsd_beta, valid_vocab=self.alignment.valid_vocab,
            chunk_size=kd.chunk_size, student_bias=s_b, normalizer=normalizer,
        )


def on_policy_objective(cfg: RunConfig, objective, student, teacher, alignment: VocabAlignment, packed,
                        student_dir, *, autocast: bool, device: str, rank: int = 0, synced: bool = False):
    """kd.on_policy enabled: GKD's objective around `objective` (kd/train/on_policy/objective.py); else `objective`."""
    from kd.train.on_policy.objective import wrap_objective

    return wrap_objective(cfg, objective, lambda c: OnlineObjective(c, student, teacher, alignment, autocast, device),
                          student, teacher, alignment, packed, student_dir, autocast=autocast, rank=rank, synced=synced)
