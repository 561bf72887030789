"""Eval on the student's own samples: what on-policy distillation optimises, measured before and after.

    spec = SampleSpec(stop_ids={2}, pad_id=2, fmt="chat", prompts=16, max_new_tokens=32, seed=0)
    report = evaluate_on_samples(teacher, before, after, heldout_split, alignment, spec, chunk_size=256)
    report.before.reverse_kl, report.after.reverse_kl, report.after.teacher_nll

The first `prompts` rows of the held-out split give one prompt each (kd/train/on_policy/prompts.py: chat = the
conversation before an assistant turn, text = a prefix). Each student completes them by sampling at T=1,
top_p=1 (its own distribution, so the per-token KL(student||teacher) averaged over its samples is the
sequence-level reverse KL that on-policy distillation minimises), with the same seed for before and after,
inside the valid vocabulary, stopping at EOS / end of turn. The teacher scores each sequence in one
forward; at every generated position both log-softmaxes are computed exactly over the valid vocabulary,
chunk by chunk (no [tokens, vocab] tensor), giving the reverse KL and the teacher's NLL of the drawn token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from backends import get_backend
from kd.data.prepared import IGNORE, Batch
from kd.train.losses import iter_logit_chunks
from kd.train.on_policy.generation import GenerationSettings, get_generator
from kd.train.on_policy.prompts import prompts_from_batch
from kd.results import OnSampleReport, SampleEval, VocabAlignment


@dataclass(frozen=True)
class SampleSpec:
    stop_ids: frozenset[int]
    pad_id: int
    fmt: str = "text"
    prompts: int = 16
    max_new_tokens: int = 32
    prompt_tokens: int = 16
    max_prompt_tokens: int = 192
    seed: int = 0
    batch_size: int = 8
    generator: str = "transformers"


def heldout_prompts(split, spec: SampleSpec) -> list[list[int]]:
    """One prompt per held-out row (the first `spec.prompts` rows, cycling if fewer), seeded choice of turn."""
    n = len(split)
    if n == 0:
        return []
    rows = [i % n for i in range(spec.prompts)]
    if hasattr(split, "batch"):
        batch = split.batch(rows)
    else:  # older runs: bare (N, L) held-out ids, every token a target
        ids = split[torch.tensor(rows)]
        batch = Batch(ids, ids[:, 1:].clone(), None)
    return prompts_from_batch(batch, fmt=spec.fmt, prompt_tokens=spec.prompt_tokens,
                              max_prompt_tokens=spec.max_prompt_tokens, rng=random.Random(spec.seed))


def _hidden_at(model, batch: Batch, keep: torch.Tensor, device) -> torch.Tensor:
    h = get_backend("hf").hidden_states(model, batch.ids.to(device), position_ids=batch.position_ids.to(device))
    return h[:, :-1].reshape(-1, h.shape[-1])[keep]


@torch.no_grad()
def _score(model, teacher, batch: Batch, alignment: VocabAlignment, *, chunk_size: int, device) -> tuple[float, float, int]:
    backend = get_backend("hf")
    keep = (batch.labels != IGNORE).reshape(-1).to(device)
    y = batch.labels.reshape(-1).to(device)[keep]
    if not len(y):
        return 0.0, 0.0, 0
    hs, ht = _hidden_at(model, batch, keep, device), _hidden_at(teacher, batch, keep, device)
    (ws, bs), (wt, bt) = backend.output_head(model), backend.output_head(teacher)
    v = alignment.valid_vocab
    kl = nll = 0.0
    teacher_chunks = iter_logit_chunks(ht, wt[: alignment.rows_kept], None if bt is None else bt[: alignment.rows_kept],
                                       chunk_size=chunk_size, valid_vocab=v)
    for (start, zs), (_, zt) in zip(iter_logit_chunks(hs, ws, bs, chunk_size=chunk_size, valid_vocab=v), teacher_chunks):
        ls, lt = torch.log_softmax(zs.float(), -1), torch.log_softmax(zt.float(), -1)
        kl += float((ls.exp() * (ls - lt)).sum())
        nll -= float(lt.gather(1, y[start: start + len(zs)].unsqueeze(1)).sum())
    return kl, nll, int(len(y))


def evaluate_model_on_samples(model, teacher, prompts: list[list[int]], alignment: VocabAlignment, spec: SampleSpec,
                              *, chunk_size: int = 256, device="cpu") -> SampleEval:
    gen = get_generator(spec.generator, stop_ids=set(spec.stop_ids), pad_id=spec.pad_id,
                        valid_vocab=alignment.valid_vocab)
    settings = GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=spec.max_new_tokens)
    kl = nll = 0.0
    tokens = stopped = 0
    for i in range(0, len(prompts), spec.batch_size):
        samples = gen.generate(model, prompts[i: i + spec.batch_size], settings, seed=spec.seed * 7919 + i)
        stopped += sum(samples.stopped)
        k, n, t = _score(model, teacher, samples.batch(), alignment, chunk_size=chunk_size, device=device)
        kl, nll, tokens = kl + k, nll + n, tokens + t
    nan = float("nan")
    return SampleEval(reverse_kl=kl / tokens if tokens else nan, teacher_nll=nll / tokens if tokens else nan,
                      tokens=tokens, samples=len(prompts), stopped=stopped)


def evaluate_on_samples(teacher, before, after, split, alignment: VocabAlignment, spec: SampleSpec, *,
                        chunk_size: int = 256, device="cpu") -> OnSampleReport:
    """Student-before and student-after, each on its own seeded samples of the same held-out prompts."""
    prompts = heldout_prompts(split, spec)
    run = lambda m: evaluate_model_on_samples(m, teacher, prompts, alignment, spec, chunk_size=chunk_size,  # noqa: E731
                                              device=device)
    return OnSampleReport(before=run(before), after=run(after), prompts=len(prompts),
                          max_new_tokens=spec.max_new_tokens, temperature=1.0, top_p=1.0, seed=spec.seed)
