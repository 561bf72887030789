"""On-policy distillation with the teacher behind the engine (issue 29): the student samples, the engine scores.

    with served_on_policy(cfg, teacher_dir, teacher_repo, alignment, log_dir=run_dir, record=rec) as scorer:
        result = train_student(cfg, ..., teacher_scorer=scorer)      # kd/train/loop.py
    # the engine (launch: vllm) is stopped here, normally or on an error; rec holds its launch, identity, stop

The design (the simplest correct one): a served teacher is never loaded into the training process.
- Off-policy micro-batches (the prepared text) train from the offline cache, which the cache step built
  through the same engine (kd.teacher_mode: offline is required; kd/teacher_cache/from_server.py).
- On-policy micro-batches (kd.on_policy.fraction > 0): each sampled sequence (prompt + completion token ids,
  right-padded) is sent whole to the engine with `prompt_logprobs: k` (k = min(kd.top_k, valid vocab)),
  and the loss on the completion tokens is the offline objective's: the sparse target of the teacher's
  top-k plus one tail bucket (kd.train.losses.fused_linear_sparse_kd_loss, `SPARSE_EXACTNESS`), at
  kd.on_policy.divergence and loss_temperature, alpha 0. It is the same computation as the in-process
  on-policy objective restricted to the same top-k (tests/test_teacher_server.py checks 1e-5).
- Not built, refused by kd.config naming the setting: teacher.server with kd.teacher_mode online (the
  prepared batches would need the engine too), with kd.on_policy.seq_kd (teacher generation through the
  engine), and with train.distributed (each rank would need the scorer).

What top-k does to the divergence (k < vocabulary):
- forward KL(p||q) over the top-k + tail bucket is exact on the top-k ids and in the tail's total mass but
  not its shape: it is a lower bound of the full KL, equal when the student's tail is proportional to the
  teacher's; its gradient is exact on the top-k ids.
- reverse KL(q||p), on-policy distillation's default, needs the teacher's log-prob of every id the student
  puts mass on: the bucketed value is a lower bound and its gradient on tail ids approximate. With the
  engine's `--max-logprobs -1` and kd.top_k >= the vocabulary size (k = V) there is no tail and it is exact
  (at any kd.on_policy.loss_temperature; with k < V the loss temperature must be 1: the engine's log-probs
  are at T = 1 and the tail mass at another T is not known from the top-k).
- The per-token Monte-Carlo estimate log q(x) - log p(x) needs only the sampled token's log-prob, exact for
  any k (`TeacherServerClient.sequence_logprobs`); kdflow's objective is the bucketed divergence above.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kd.errors import ConfigError

LOGPROB_MODE = "raw_logprobs"


def scoring_k(k: int, vocab: int, loss_temperature: float) -> int:
    """prompt_logprobs to ask for on-policy; refuses a loss temperature the top-k cannot give exactly."""
    if k >= vocab:
        return vocab
    if loss_temperature != 1.0:
        raise ConfigError(f"kd.on_policy.loss_temperature: {loss_temperature:g} with teacher.server: the engine's "
                          f"log-probs are at T=1 and the tail mass at T={loss_temperature:g} is not known from the top-{k}; "
                          f"set kd.on_policy.loss_temperature: 1, or kd.top_k >= the vocabulary ({vocab}) with the "
                          "engine's --max-logprobs -1")
    return k


class ServedScores:
    """The engine as a teacher-cache reader for generated batches: `targets(ids, position_ids)` -> the sparse
    targets (ids (N, k), log-probs (N, k), log tail (N,)) of every next-token position, `cache_temperature`.
    kd.train.objectives.OfflineObjective trains from it exactly as from the cache."""

    def __init__(self, client, spec, *, temperature: float, k: int):
        from kd.teacher_cache.from_server import server_targets

        self.client, self.spec, self.k = client, spec, k
        self.cache_temperature = temperature
        self._targets = server_targets(client, spec, temperature=temperature, k=k)
        self.stats = {"batches": 0, "sequences": 0, "tokens": 0, "seconds": 0.0}
        self.info: dict = {}

    def targets(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        t0 = time.perf_counter()
        out = self._targets(ids, position_ids)
        self.stats["batches"] += 1
        self.stats["sequences"] += int(ids.shape[0])
        self.stats["tokens"] += int(ids.numel())
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def describe(self) -> dict:
        """For the run's result and manifest: the engine that scored the samples and what it was asked."""
        return {**self.info, "prompt_logprobs": self.k, "top_k": self.spec.k, "vocab": self.spec.vocab,
                "loss_temperature": self.cache_temperature, "logprobs_mode": LOGPROB_MODE,
                "exact": self.k >= self.spec.vocab, "scored": dict(self.stats)}


@contextmanager
def served_on_policy(cfg, teacher_dir: str | Path, teacher_repo: str, alignment, *, log_dir: str | Path,
                     record: dict | None = None) -> Iterator[ServedScores]:
    """The engine for a run's on-policy steps: `teacher.server.url`, or `vllm serve` started here (launch: vllm)
    and stopped when the block ends or fails (kd/teacher_server/launch.py: the whole process group, nothing
    left behind); checked to be the configured teacher (identity.py) before a step runs. `record` receives
    the launch (pid, url, startup_s, and on exit the stop), the identity report and `engine`."""
    from kd.teacher_cache.from_server import LOGPROB_MODE as _MODE, teacher_encoder, teacher_reference
    from kd.teacher_cache.step import spec_for
    from kd.teacher_server.client import TeacherServerClient
    from kd.teacher_server.identity import check_served_teacher
    from kd.teacher_server.launch import served_teacher

    server, op = cfg.teacher.server, cfg.kd.on_policy
    if server is None:
        raise ConfigError("served_on_policy: teacher.server is not set")
    spec = spec_for(cfg, alignment)
    k = scoring_k(spec.k, spec.vocab, op.loss_temperature)  # refused before anything starts
    record = {} if record is None else record
    launch = record.setdefault("launch", {})
    t0 = time.perf_counter()
    with served_teacher(server, teacher_dir, log_dir=log_dir, record=launch) as url, \
            TeacherServerClient(url, server) as client:
        report = check_served_teacher(
            client, teacher=teacher_repo, vocab=alignment.teacher_rows, k=k, encode=teacher_encoder(str(teacher_dir)),
            reference=teacher_reference(str(teacher_dir), cfg.teacher.trust_remote_code)
            if server.identity_probe == "forward" else None, tolerance=server.probe_tolerance)
        longest = op.max_prompt_tokens + op.max_new_tokens
        if report.get("max_model_len") and longest > int(report["max_model_len"]):
            raise ConfigError(f"teacher server {client.where}: on-policy sequences of up to {longest} tokens "
                              f"(kd.on_policy.max_prompt_tokens + max_new_tokens) exceed the engine's --max-model-len "
                              f"{report['max_model_len']}")
        record["identity"] = report
        scorer = ServedScores(client, spec, temperature=op.loss_temperature, k=k)
        scorer.info = {"engine": "vllm", "url": client.where, "engine_version": report.get("engine_version"),
                       "served_model": report.get("served_model"), "launched": bool(launch.get("launched")),
                       "logprobs_mode": _MODE, "dtype": server.dtype, "ready_s": time.perf_counter() - t0}
        record["engine"] = scorer.info
        record["scorer"] = scorer
        yield scorer
