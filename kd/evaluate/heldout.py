"""Held-out metrics of teacher and student: next-token loss, perplexity, KL to the teacher, top-1.

    m = evaluate_model(student, teacher, blocks, rows_kept=..., valid_vocab=..., batch_size=8)

Metrics are next-token prediction (position t predicts token t+1) over the *aligned* vocab: every
model's output matrix is cut to its first `valid_vocab` rows, which is the same as cutting the
teacher to `rows_kept` and masking ids ≥ `valid_vocab` (padding rows) out of both softmaxes.
The teacher's own loss is therefore over the shared vocab too, so all three rows of the table are
comparable. Logits exist only for `chunk_size` tokens at a time (hidden states × output matrix):
a (N, 152k) logits tensor for a real model would be gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kd.data.prepared import IGNORE
from kd.errors import DataError, VocabError
from kd.evaluate.gates import METRICS
from kd.results import ModelEval


@dataclass
class _Acc:
    """Running sums for one model (python floats are float64: no drift over many chunks)."""

    compare: bool
    n: int = 0
    loss: float = 0.0
    kl: float = 0.0
    agree: int = 0
    entropy: float = 0.0
    counts: torch.Tensor | None = field(default=None, repr=False)

    def result(self) -> ModelEval:
        n = self.n or float("nan")  # nothing scored: NaN metrics, which the FINITE gate fails
        loss = self.loss / n
        # exp overflows a double above ~709.78 nats; such a model is broken anyway (and fails FINITE).
        ppl = math.exp(loss) if loss < 709.0 else (float("inf") if loss == loss else float("nan"))
        share = float(self.counts.max().item()) / n if self.counts is not None else float("nan")
        return ModelEval(
            loss=loss,
            perplexity=ppl,
            kl_to_teacher=self.kl / n if self.compare else None,
            top1_agreement=self.agree / n if self.compare else None,
            entropy=self.entropy / n,
            top_token_share=share,
            tokens=self.n,
        )


def output_rows(model, backend, valid_vocab: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = backend.output_head(model)
    if w.shape[0] < valid_vocab:
        raise VocabError(f"{what} output matrix has {w.shape[0]} rows, fewer than valid_vocab={valid_vocab}")
    return w[:valid_vocab], (b[:valid_vocab] if b is not None else None)


def log_probs(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(n, H) hidden × (V, H) head -> (n, V) float32 log-probs. Matmul in the model dtype (no fp32
    copy of a 152k-row matrix), softmax in float32."""
    return F.log_softmax(F.linear(h, w, b).float(), dim=-1)


@torch.no_grad()
def evaluate_models(
    models: list[torch.nn.Module],
    teacher: torch.nn.Module | None,
    blocks: torch.Tensor,
    *,
    compare: list[bool],
    rows_kept: int,
    valid_vocab: int,
    batch_size: int,
    chunk_size: int,
    device,
    max_batches: int | None,
    backend: str,
) -> list[ModelEval]:
    """One pass over `blocks` for several models, sharing the teacher's forward pass."""
    from backends import get_backend

    be = get_backend(backend)
    shape = tuple(blocks.shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] < 2:
        raise DataError(f"held-out blocks must be a non-empty (B, T≥2) tensor, got shape {shape}")
    if not 0 < valid_vocab <= rows_kept:
        raise VocabError(f"valid_vocab={valid_vocab} must be in 1..rows_kept={rows_kept}")
    if batch_size <= 0 or chunk_size <= 0:
        raise ValueError(f"batch_size and chunk_size must be > 0, got {batch_size}, {chunk_size}")
    if any(compare) and teacher is None:
        raise ValueError("KL/agreement need a teacher")

    for m in [*models, teacher]:
        if m is not None:
            m.eval()  # dropout off; eval never trains
    heads = [output_rows(m, be, valid_vocab, f"model {i}") for i, m in enumerate(models)]
    t_head = output_rows(teacher, be, valid_vocab, "teacher") if teacher is not None else None
    accs = [_Acc(compare=c, counts=torch.zeros(valid_vocab, dtype=torch.long, device=device)) for c in compare]

    for bi, start in enumerate(range(0, shape[0], batch_size)):
        if max_batches is not None and bi >= max_batches:
            break
        inp, pos, tgt = eval_batch(blocks, start, batch_size, valid_vocab, device)
        keep = (tgt != IGNORE).nonzero().squeeze(1)  # exactly the tokens training puts a loss on
        tgt = tgt.index_select(0, keep)
        cache: dict[int, torch.Tensor] = {}

        def hidden(m):
            # The same module (teacher evaluated as itself) is run once per batch.
            if id(m) not in cache:
                h = be.hidden_states(m, inp, position_ids=pos)
                cache[id(m)] = h.reshape(-1, h.shape[-1]).index_select(0, keep)
            return cache[id(m)]

        hs = [hidden(m) for m in models]
        ht = hidden(teacher) if teacher is not None else None
        n = tgt.shape[0]
        for s in range(0, n, chunk_size):
            y = tgt[s : s + chunk_size]
            lt = log_probs(ht[s : s + chunk_size], *t_head) if ht is not None else None
            t_arg = lt.argmax(-1) if lt is not None else None
            for m, acc, h, head in zip(models, accs, hs, heads):
                # The teacher evaluated as itself reuses its log-probs.
                lm = lt if m is teacher else log_probs(h[s : s + chunk_size], *head)
                pm = lm.exp()
                arg = lm.argmax(-1)
                acc.loss += float(F.nll_loss(lm, y, reduction="sum"))
                acc.entropy += float(-(pm * lm).sum())
                acc.counts += torch.bincount(arg, minlength=valid_vocab)
                if acc.compare:
                    # KL(p_t || p_m) = sum p_t (log p_t - log p_m); p_t = 0 terms contribute 0.
                    acc.kl += float(F.kl_div(lm, lt, reduction="sum", log_target=True))
                    acc.agree += int((arg == t_arg).sum())
                acc.n += y.shape[0]
    return [a.result() for a in accs]


def eval_batch(blocks, start: int, batch_size: int, valid_vocab: int, device):
    """(inputs (B, T-1), position ids or None, labels (N,) with -100 = not scored) for blocks[start:...].
    `blocks`: a (B, T) id tensor (every next token scored) or a prepared `Split` (its loss mask)."""
    if isinstance(blocks, torch.Tensor):
        x = blocks[start : start + batch_size]
        inp, pos, tgt = x[:, :-1], None, x[:, 1:].reshape(-1)  # position t predicts token t+1
    else:
        b = blocks.batch(range(start, min(start + batch_size, len(blocks))))
        x, inp, pos, tgt = b.ids, b.ids[:, :-1], b.position_ids[:, :-1], b.labels.reshape(-1)
    outside = x[(x < 0) | (x >= valid_vocab)]
    if outside.numel():
        raise DataError(
            f"held-out blocks contain token id {int(outside[0])}, outside the aligned vocab 0..{valid_vocab - 1}"
        )
    return inp.to(device), None if pos is None else pos.to(device), tgt.to(device)


def evaluate_model(
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    blocks: torch.Tensor,
    *,
    rows_kept: int,
    valid_vocab: int,
    batch_size: int,
    chunk_size: int = 256,
    device="cpu",
    max_batches: int | None = None,
    backend: str = "hf",
) -> ModelEval:
    """Held-out metrics of `model` on `blocks` (LongTensor (B, T)), batched, no grad, chunked.

    With a `teacher`, also KL(teacher‖model) at T=1 and top-1 agreement over the aligned vocab.
    `teacher=None` evaluates a model on its own (use it for the teacher itself): `kl_to_teacher`
    and `top1_agreement` are then None, not the trivial 0 and 1, so no table shows a
    "perfect" number that was never measured. Models must already be on `device`.
    """
    return evaluate_models(
        [model], teacher, blocks, compare=[teacher is not None], rows_kept=rows_kept,
        valid_vocab=valid_vocab, batch_size=batch_size, chunk_size=chunk_size, device=device,
        max_batches=max_batches, backend=backend,
    )[0]


