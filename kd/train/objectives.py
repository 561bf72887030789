"""The objectives: what one training step asks of the teacher, as one protocol for both loops.

    objective = make_objective(cfg, student, teacher, offline, alignment, autocast=False, device="cpu")
    objective = on_policy_objective(cfg, objective, student, teacher, alignment, packed, student_dir, ...)
    out = objective(batch, normalizer=n_tokens)      # a kd.train.losses.KDLossOutput: .loss .ce .kd .tokens

An `Objective` maps a micro-batch to the KD loss through the fused-linear losses (kd/train/losses.py),
never materialising [tokens, vocab] logits:
    OnlineObjective    the frozen teacher in memory runs on every batch (kd.teacher_mode: online); without a
                       teacher (alpha = 1, fine-tuning only) the student stands in for it at weight 0
    CrossTokenizerObjective  a teacher with another tokenizer (check_vocab's verdict cross-tokenizer): byte-aligned
                       groups, kd/train/cross_objective.py
    OfflineObjective   the teacher's cached top-k (kd.teacher_mode: offline, kd/teacher_cache/): no teacher
                       in memory; `open_teacher_cache` gives the verified reader bound to the training data
    OnPolicyObjective  GKD around either of them (kd.on_policy): per micro-batch the student (or the
                       teacher) generates the completions that are trained (below); with the teacher
                       behind an inference engine (teacher.server) the engine scores the samples'
                       top-k and they train as OfflineObjective (kd/teacher_server/on_policy.py)
The single-process loop (kd/train/loop.py) and the torch.distributed loop (kd/train/distributed/loop.py)
build them with the same calls here.

On-policy (GKD, issue 17):

    objective.at(step, micro)        # before each micro-batch (the draw and the sampling seed depend on it)
    ready = objective.prepare(batch) # the draw and, on-policy, the generation: a `Drawn` batch
    out = objective(ready, normalizer=n)
    objective.take_stats()           # generation seconds, new tokens, samples since the last call

With u = Random(seed, step, micro).random(): u < kd.on_policy.fraction -> the student samples
completions of the batch's prompts (on-policy); else with kd.on_policy.seq_kd the teacher does;
else the prepared batch is used as is (off-policy, kd.divergence). A generated batch is scored by
the teacher in one forward pass and trained with kd.on_policy.divergence at loss_temperature over
its completion tokens only (alpha 0), through the same fused-linear loss (no [tokens, vocab]
logits), valid-vocab and ignore rules. The draw does not depend on the rank, so every rank of a
distributed run takes the same kind of batch at the same time. Prompts and generation:
kd/train/on_policy/.

The training loops prepare every micro-batch of a step (so generate every completion) before the first
backward, to count the step's trained tokens: completions of different lengths then weigh per token,
like prepared tokens (kd/train/loss_normalization.py says why this order). `objective(batch)` on a plain
batch prepares it first (the probe, the tests).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from backends import get_backend
from kd.config import RunConfig
from kd.data import Batch
from kd.errors import ConfigError
from kd.results import TeacherCacheResult, VocabAlignment
from kd.cross_tokenizer.report import load_pair
from kd.cross_tokenizer.stored import stored_groups
from kd.train.cross_objective import CrossTokenizerObjective
from kd.train.losses import KDLossOutput, fused_linear_kd_loss, fused_linear_sparse_kd_loss
from kd.train.on_policy.generation import GenerationSettings, get_generator, sample_seed, stop_ids_of
from kd.train.on_policy.prompts import prompts_from_batch


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
                   device: str, model_dirs: tuple | None = None, prepared_root=None) -> Objective:
    """`offline` (open_teacher_cache's reader) -> OfflineObjective; the verdict `cross-tokenizer` with a
    teacher -> CrossTokenizerObjective (needs `model_dirs` = (teacher_dir, student_dir): their tokenizers; with
    `prepared_root`, the prepared set's stored groups, kd/cross_tokenizer/stored.py);
    else OnlineObjective with `teacher` (None: fine-tuning only, the CE needs no teacher tokenizer)."""
    if alignment.verdict == "cross-tokenizer" and offline is None and teacher is not None:
        if model_dirs is None:
            raise ConfigError("the cross-tokenizer objective needs the teacher's and student's folders (tokenizers)")
        pair = load_pair(*model_dirs)
        groups = None if prepared_root is None else stored_groups(prepared_root, pair, *model_dirs)
        return CrossTokenizerObjective(cfg, student, teacher, pair, autocast=autocast, device=device, groups=groups)
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
                        student_dir, *, autocast: bool, device: str, rank: int = 0, synced: bool = False,
                        scorer=None):
    """kd.on_policy enabled: an OnPolicyObjective around `objective`; else `objective` itself. Generated batches
    are trained by an OnlineObjective built for their config (divergence, temperature, alpha 0), or, with
    `scorer` (the teacher behind an inference engine, kd/teacher_server/on_policy.py `ServedScores`), by an
    OfflineObjective reading the engine's top-k + tail for the sampled sequences: the sparse target of the
    offline cache, at the generated batches' divergence and temperature (teacher-server docs: what top-k
    does to the divergence)."""
    if not cfg.kd.on_policy.enabled:
        return objective
    if teacher is None and scorer is None:
        raise ConfigError("kd.on_policy.fraction / kd.on_policy.seq_kd: generated completions need the teacher "
                          "online (or served: teacher.server); kd.teacher_mode: offline has only a cache of the "
                          "prepared tokens")
    if scorer is not None and cfg.kd.on_policy.seq_kd:
        raise ConfigError("kd.on_policy.seq_kd with teacher.server: teacher generation through the engine is not built")
    stops = stop_ids_of(student_dir)
    fmt = getattr(packed, "manifest", {}).get("format", "text")
    make = ((lambda c: OfflineObjective(c, student, scorer, alignment, autocast, device)) if scorer is not None
            else (lambda c: OnlineObjective(c, student, teacher, alignment, autocast, device)))
    return OnPolicyObjective(cfg, objective, make, student, teacher, alignment, fmt=fmt, stop_ids=stops,
                             pad_id=min(stops), autocast=autocast, rank=rank, synced=synced)


# ---------------------------------------------------------------- on-policy (GKD)
KINDS = ("off_policy", "on_policy", "seq_kd")


@dataclass
class Drawn(Batch):
    """A micro-batch after its draw: the prepared batch (off_policy) or prompts + generated completions, whose
    labels are the completion tokens only (on_policy / seq_kd). Its labels are what the loss trains."""

    kind: str = "off_policy"


def batch_kind(op, seed: int, step: int, micro: int) -> str:
    """off_policy | on_policy | seq_kd for micro-batch (step, micro): a pure function of its arguments."""
    u = random.Random(f"kdflow-gkd-{seed}-{step}-{micro}").random()
    if u < op.fraction:
        return "on_policy"
    return "seq_kd" if op.seq_kd else "off_policy"


class OnPolicyObjective:
    def __init__(self, cfg, base, make_objective, student, teacher, alignment, *, fmt: str, stop_ids: set[int],
                 pad_id: int, autocast: bool, rank: int = 0, synced: bool = False):
        """`base`: the objective for prepared batches; `make_objective(cfg)` builds the same objective
        for another config (here: the generated batches' divergence, temperature and alpha 0)."""
        op = cfg.kd.on_policy
        self.cfg, self.op, self.base, self.student, self.teacher = cfg, op, base, student, teacher
        gen_cfg = cfg.model_copy(deep=True)
        gen_cfg.kd.alpha, gen_cfg.kd.divergence, gen_cfg.kd.temperature = 0.0, op.divergence, op.loss_temperature
        self.generated = make_objective(gen_cfg)
        self.fmt, self.rank, self.synced = fmt, rank, synced
        self.generator = get_generator(op.generator, stop_ids=stop_ids, pad_id=pad_id,
                                       valid_vocab=alignment.valid_vocab, autocast=autocast)
        self.settings = GenerationSettings.of(op)
        self.step = self.micro = 0
        self.stats = self._zero()
        self.last_samples = None
        self.force_off_policy = False  # the probe batch (initial / final loss) is always the prepared one

    @staticmethod
    def _zero() -> dict:
        return {"gen_s": 0.0, "gen_tokens": 0, "samples": 0, "stopped": 0, **{k: 0 for k in KINDS}}

    def at(self, step: int, micro: int) -> None:
        self.step, self.micro = step, micro

    def take_stats(self) -> dict:
        s, self.stats = self.stats, self._zero()
        return s

    def sample(self, batch: Batch, kind: str):
        """Prompts of `batch` completed by the student (on_policy) or the teacher (seq_kd)."""
        seed = sample_seed(self.cfg.train.seed, self.step, self.micro, self.rank)
        rng = random.Random(seed)
        prompts = prompts_from_batch(batch, fmt=self.fmt, prompt_tokens=self.op.prompt_tokens,
                                     max_prompt_tokens=self.op.max_prompt_tokens, rng=rng)
        model = self.student if kind == "on_policy" else self.teacher
        return self.generator.generate(model, prompts, self.settings, seed=seed, synced=self.synced)

    def prepare(self, batch):
        """The batch micro-batch (step, micro) trains: the draw, and for on_policy / seq_kd the completions
        (a `Drawn`); bare ids and the probe (force_off_policy) pass through unchanged."""
        if not isinstance(batch, Batch) or isinstance(batch, Drawn) or self.force_off_policy:
            return batch
        kind = batch_kind(self.op, self.cfg.train.seed, self.step, self.micro)
        self.stats[kind] += 1
        if kind == "off_policy":
            return Drawn(batch.ids, batch.labels, batch.position_ids, rows=batch.rows, split=batch.split, kind=kind)
        samples = self.sample(batch, kind)
        self.last_samples = samples
        self.stats["gen_s"] += samples.seconds
        self.stats["gen_tokens"] += samples.new_tokens
        self.stats["samples"] += len(samples.completions)
        self.stats["stopped"] += sum(samples.stopped)
        b = samples.batch()
        return Drawn(b.ids, b.labels, b.position_ids, kind=kind)

    def __call__(self, batch, normalizer: float | None = None):
        """The loss of `batch` (prepared first unless it is a `Drawn`): token sums / normalizer, or token means."""
        batch = self.prepare(batch)
        generated = isinstance(batch, Drawn) and batch.kind != "off_policy"
        return (self.generated if generated else self.base)(batch, normalizer=normalizer)


def generation_row(stats: dict, step_s: float) -> dict:
    """Metrics of one step's generation: tokens/s while generating and its share of the step's time."""
    return {"gen_s": stats["gen_s"], "gen_tokens": stats["gen_tokens"], "samples": stats["samples"],
            "gen_tokens_per_s": stats["gen_tokens"] / stats["gen_s"] if stats["gen_s"] > 0 else 0.0,
            "gen_share": stats["gen_s"] / step_s if step_s > 0 else 0.0,
            **{f"batches_{k}": stats[k] for k in KINDS}, "stopped": stats["stopped"]}


def on_policy_summary(cfg, metrics_path: Path) -> dict:
    """The policy settings and what was generated over the whole run (the logged metrics.jsonl rows, resumed
    attempts included; every step when train.log_every is 1)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "gen_s" in r]
    gen_s, step_s = sum(r["gen_s"] for r in rows), sum(r["step_s"] for r in rows)
    tokens = sum(r["gen_tokens"] for r in rows)
    return {"settings": cfg.kd.on_policy.model_dump(mode="json"), "samples": sum(r["samples"] for r in rows),
            "generated_tokens": tokens, "stopped_at_eos": sum(r["stopped"] for r in rows),
            "batches": {k: sum(r[f"batches_{k}"] for r in rows) for k in KINDS},
            "gen_tokens_per_s": tokens / gen_s if gen_s > 0 else 0.0,
            "gen_share": gen_s / step_s if step_s > 0 else 0.0, "logged_steps": len(rows)}
