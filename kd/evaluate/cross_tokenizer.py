"""Held-out metrics across tokenizers (kd.cross_tokenizer): bits per byte on the same bytes for every model.

    teacher_eval, before, after = evaluate_cross([teacher, before, after], teacher, heldout, pair, batch_size=8,
                                                 chunk_size=256, device="cpu")

Per-token loss, KL(teacher||student) and top-1 agreement need one vocabulary: with different tokenizers a
token of one side is not a token of the other. What every model can say about the same text is the
probability of its *bytes*: the student blocks are cut into document pieces, re-tokenized by the teacher and
byte-aligned (kd/cross_tokenizer/blocks.py's plan_batch, as in training), and each model's negative
log-likelihood of its own tokens over the same groups (each piece's first group dropped on both sides, since
the teacher sees only the piece; groups with an untrained token dropped) is divided by those groups' bytes:

    bits_per_byte = sum NLL (nats) / ln 2 / bytes        (the same bytes for teacher, before and after)

`loss` / `perplexity` / `entropy` / `top_token_share` are each model's own per-token numbers (not comparable
between teacher and student: other tokens); `kl_to_teacher` and `top1_agreement` are None (not applicable).
What is comparable is restated on the same groups (kd/cross_tokenizer/group_eval.py): each student's
`group_kl_to_teacher` (mean binary KL of the realized group text, teacher || student) and `group_top1_agreement`
(share of groups where both agree whether the realized text is their top choice); None on the teacher's row.
The eval gates state the bits-per-byte claim and the group-KL one instead of the per-token KL (kd/evaluate/gates.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.blocks import plan_batch
from kd.cross_tokenizer.group_eval import end_of_turn_index, group_binary_kl, group_outcomes, turn_end_logprobs
from kd.cross_tokenizer.merge import group_index
from kd.cross_tokenizer.report import special_ids
from kd.cross_tokenizer.stored import stored_rows
from kd.data.prepared import IGNORE
from kd.errors import DataError
from kd.results import ModelEval


class _Sums:
    def __init__(self, vocab: int):
        self.n, self.nll, self.entropy = 0, 0.0, 0.0
        self.counts = torch.zeros(vocab, dtype=torch.long)
        self.groups, self.group_kl, self.group_agree = 0, 0.0, 0  # against the teacher, over the same groups
        self.turn_ends, self.eot_kl, self.eot_gap = 0, 0.0, 0.0  # against the teacher, over the same turn ends

    def add_groups(self, teacher: tuple[torch.Tensor, torch.Tensor], mine: tuple[torch.Tensor, torch.Tensor]) -> None:
        """(log p, top?) per group from group_outcomes, the teacher's and this model's."""
        self.groups += int(mine[0].shape[0])
        self.group_kl += float(group_binary_kl(teacher[0], mine[0]).sum())
        self.group_agree += int((teacher[1] == mine[1]).sum())

    def add_turn_ends(self, lt: torch.Tensor, ls: torch.Tensor) -> None:
        """(E,) log p of "the turn ends here", the teacher's and this model's (group_eval.turn_end_logprobs)."""
        self.turn_ends += int(ls.shape[0])
        self.eot_kl += float(group_binary_kl(lt, ls).sum())
        self.eot_gap += float((lt.double().exp() - ls.double().exp()).abs().sum())

    def result(self, n_bytes: int, compared: bool) -> ModelEval:
        n, g = self.n or float("nan"), self.groups or float("nan")
        eot = compared and self.turn_ends > 0
        loss = self.nll / n
        return ModelEval(loss=loss, perplexity=math.exp(loss) if loss < 709.0 else float("inf"), kl_to_teacher=None,
                         top1_agreement=None, entropy=self.entropy / n,
                         top_token_share=float(self.counts.max()) / n, tokens=self.n,
                         bits_per_byte=self.nll / math.log(2) / n_bytes if n_bytes else float("nan"),
                         group_kl_to_teacher=self.group_kl / g if compared else None,
                         group_top1_agreement=self.group_agree / g if compared else None,
                         groups=self.groups if compared else None,
                         end_of_turn_kl=self.eot_kl / self.turn_ends if eot else None,
                         end_of_turn_gap=self.eot_gap / self.turn_ends if eot else None,
                         turn_ends=self.turn_ends if eot else None)


def _score(acc: _Sums | None, hidden: torch.Tensor, w: torch.Tensor, b, ids: torch.Tensor,
           chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the per-token numbers into `acc` (None: only score); (N,) realized log-probs and (N,) bool: the
    model's argmax is the realized token."""
    lps, hits = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        lp = F.log_softmax(F.linear(hidden[s:s + chunk_size], w, b).float(), -1)
        y = ids[s:s + chunk_size]
        picked, top = lp.gather(1, y.unsqueeze(1)).squeeze(1), lp.argmax(-1)
        lps.append(picked.cpu())
        hits.append((top == y).cpu())
        if acc is not None:
            acc.nll += float(-picked.sum())
            acc.entropy += float(-(lp.exp() * lp).sum())
            acc.counts += torch.bincount(top.cpu(), minlength=acc.counts.shape[0])
            acc.n += y.shape[0]
    if not lps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(lps), torch.cat(hits)


def _kept_bounds(bounds, keep: torch.Tensor) -> torch.Tensor:
    """(G+1,) bounds over all groups -> (K+1,) bounds over the kept groups' tokens (as they are selected)."""
    sizes = torch.diff(torch.as_tensor(bounds, dtype=torch.long))[keep]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


@torch.no_grad()
def evaluate_cross(models: list, teacher, blocks, pair: TokenizerPair, *, batch_size: int, chunk_size: int = 256,
                   device="cpu", max_batches: int | None = None, backend: str = "hf",
                   groups: dict | None = None) -> list[ModelEval]:
    """`models` (students on pair.student's tokenizer; the teacher itself may be among them, scored on its own
    tokens) over held-out `blocks` ((B, L) ids or a prepared Split); one ModelEval per model (module docstring).
    The teacher runs on every batch (the students' group numbers are against it), once even when among `models`.
    `groups` ({split: StoredGroups}, kd/cross_tokenizer/stored.py): a prepared Split's pieces are read from them
    rather than aligned here."""
    from backends import get_backend

    be = get_backend(backend)
    vs, vt = len(pair.student_bytes), len(pair.teacher_bytes)
    specials = special_ids(pair.student)
    for m in models:
        m.eval()
    sums = [_Sums(vt if m is teacher else vs) for m in models]
    n_bytes = 0
    total = blocks.shape[0] if isinstance(blocks, torch.Tensor) else len(blocks)
    if total == 0:
        raise DataError("no held-out blocks to evaluate")
    for bi, start in enumerate(range(0, total, batch_size)):
        if max_batches is not None and bi >= max_batches:
            break
        if isinstance(blocks, torch.Tensor):
            ids = blocks[start:start + batch_size]
            pos, labels, segs = None, ids[:, 1:], None
        else:
            bt = blocks.batch(range(start, min(start + batch_size, total)))
            ids, pos, labels, segs = bt.ids, bt.position_ids, bt.labels, stored_rows(groups or {}, bt)
        plan = plan_batch(pair, ids.numpy(), None if pos is None else pos.numpy(), labels.numpy(), specials, IGNORE,
                          segments=segs)
        keep = torch.as_tensor(plan.keep)
        if not keep.any():
            continue
        n_bytes += int(plan.group_bytes[plan.keep].sum())
        s_tok = keep[group_index(torch.as_tensor(plan.sb))]
        t_tok = keep[group_index(torch.as_tensor(plan.tb))]
        s_rows = torch.as_tensor(plan.s_rows)[s_tok].to(device)
        s_ids = torch.as_tensor(plan.s_ids)[s_tok].to(device)
        t_rows = torch.as_tensor(plan.t_rows)[t_tok].to(device)
        t_ids = torch.as_tensor(plan.t_ids)[t_tok].to(device)
        tb, sb = _kept_bounds(plan.tb, keep), _kept_bounds(plan.sb, keep)
        w, b = be.output_head(teacher)
        hs = [be.hidden_states(teacher, torch.as_tensor(q, device=device).unsqueeze(0),
                               position_ids=torch.as_tensor(p, device=device).unsqueeze(0))[0]
              for q, p in zip(plan.t_seqs, plan.t_pos) if len(q)]
        h_all = torch.cat(hs)
        h = h_all.index_select(0, t_rows)
        t_acc = next((acc for m, acc in zip(models, sums) if m is teacher), None)
        t_groups = group_outcomes(*_score(t_acc, h, w[:vt], None if b is None else b[:vt], t_ids, chunk_size), tb)
        eot = end_of_turn_index(torch.as_tensor(plan.eot_s), torch.as_tensor(plan.eot_t))
        ev_t = eot[2].to(device)  # the turn ends' teacher tokens, scored apart (not among the kept groups')
        lt_tok = _score(None, h_all.index_select(0, torch.as_tensor(plan.t_rows).to(device)[ev_t]), w[:vt],
                        None if b is None else b[:vt], torch.as_tensor(plan.t_ids).to(device)[ev_t], chunk_size)[0]
        ev_s_rows = torch.as_tensor(plan.s_rows)[eot[0]].to(device)
        ev_s_ids = torch.as_tensor(plan.s_ids)[eot[0]].to(device)
        local = (torch.arange(len(eot[0])), eot[1], torch.arange(len(eot[2])), eot[3], eot[4])
        for m, acc in zip(models, sums):
            if m is teacher:
                continue
            w, b = be.output_head(m)
            x, p = ids.to(device), None if pos is None else pos.to(device)
            h = be.hidden_states(m, x, position_ids=p)
            h = h.reshape(-1, h.shape[-1])
            acc.add_groups(t_groups, group_outcomes(*_score(acc, h.index_select(0, s_rows), w[:vs],
                                                             None if b is None else b[:vs], s_ids, chunk_size), sb))
            if eot[4]:
                ls_tok = _score(None, h.index_select(0, ev_s_rows), w[:vs], None if b is None else b[:vs], ev_s_ids,
                                chunk_size)[0]
                acc.add_turn_ends(*turn_end_logprobs(ls_tok, lt_tok, local)[::-1])
    return [acc.result(n_bytes, compared=m is not teacher) for m, acc in zip(models, sums)]
