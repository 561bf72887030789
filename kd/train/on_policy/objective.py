"""GKD's training objective: per micro-batch, a seeded draw decides where the sequences come from.

    objective = OnPolicyObjective(cfg, base, student, teacher, alignment, fmt="chat", stop_ids=..., pad_id=...)
    objective.at(step, micro)        # before each micro-batch (the draw and the sampling seed depend on it)
    ready = objective.prepare(batch) # the draw and, on-policy, the generation: a `Drawn` batch
    out = objective(ready, normalizer=n)  # a kd.train.losses KDLossOutput, as kd.train.objectives' objectives give
    objective.take_stats()           # generation seconds, new tokens, samples since the last call

With u = Random(seed, step, micro).random(): u < kd.on_policy.fraction -> the student samples
completions of the batch's prompts (on-policy); else with kd.on_policy.seq_kd the teacher does;
else the prepared batch is used as is (off-policy, kd.divergence). A generated batch is scored by
the teacher in one forward pass and trained with kd.on_policy.divergence at loss_temperature over
its completion tokens only (alpha 0), through the same fused-linear loss (no [tokens, vocab]
logits), valid-vocab and ignore rules. The draw does not depend on the rank, so every rank of a
distributed run takes the same kind of batch at the same time.

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

from kd.data.prepared import Batch
from kd.train.on_policy.generation import GenerationSettings, get_generator, sample_seed
from kd.train.on_policy.prompts import prompts_from_batch

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
        """`base`: kd.train.objectives' objective for prepared batches; `make_objective(cfg)` builds the same objective
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
            return Drawn(batch.ids, batch.labels, batch.position_ids, kind)
        samples = self.sample(batch, kind)
        self.last_samples = samples
        self.stats["gen_s"] += samples.seconds
        self.stats["gen_tokens"] += samples.new_tokens
        self.stats["samples"] += len(samples.completions)
        self.stats["stopped"] += sum(samples.stopped)
        b = samples.batch()
        return Drawn(b.ids, b.labels, b.position_ids, kind)

    def __call__(self, batch, normalizer: float | None = None):
        """The loss of `batch` (prepared first unless it is a `Drawn`): token sums / normalizer, or token means."""
        batch = self.prepare(batch)
        generated = isinstance(batch, Drawn) and batch.kind != "off_policy"
        return (self.generated if generated else self.base)(batch, normalizer=normalizer)


def wrap_objective(cfg, objective, make_objective, student, teacher, alignment, packed, student_dir, *,
                   autocast: bool, rank: int = 0, synced: bool = False):
    """kd.on_policy enabled: an OnPolicyObjective around `objective`; else `objective` itself."""
    if not cfg.kd.on_policy.enabled:
        return objective
    if teacher is None:
        from kd.errors import ConfigError

        raise ConfigError("kd.on_policy.fraction / kd.on_policy.seq_kd: generated completions need the teacher "
                          "online; kd.teacher_mode: offline has only a cache of the prepared tokens")
    from kd.train.on_policy.generation import stop_ids_of

    stops = stop_ids_of(student_dir)
    fmt = getattr(packed, "manifest", {}).get("format", "text")
    return OnPolicyObjective(cfg, objective, make_objective, student, teacher, alignment, fmt=fmt, stop_ids=stops,
                             pad_id=min(stops), autocast=autocast, rank=rank, synced=synced)


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
