"""Cross-tokenizer KD losses on byte-aligned groups, chunked: ULD, the exact-match hybrid, the projection KL.

    cfg = CrossTokenizerLoss(kind="projection", top_k=64)
    out = cross_tokenizer_kd_loss(Side(s_hidden, s_weight, s_ids, s_bounds), Side(t_hidden, t_weight, t_ids,
                                  t_bounds), cfg, alpha=0.3, temperature=4.0, projection=proj)  # or vocab_map=
    out.loss.backward(); out.ce, out.kd, out.tokens  (tokens = groups counted)

Per group g (align.py) each side's distributions merge by the chain rule (merge.py) into a measure over its
own vocabulary: m_s (student, Vs entries) and m_t (teacher, Vt), at temperature T. The objective, like
kd/train/losses.py's (Hinton et al. 2015), is

    L = alpha * mean_{student tokens} CE  +  (1 - alpha) * T^2 * mean_{groups} D(m_t, m_s)

with D by `kind`:
- `uld`: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
  Universal Logit Distillation Loss for LLMs", eq. 3-4): sort both measures in descending order, zero-pad the
  shorter, L1 = the closed-form Wasserstein-1 distance under their uniform-cost assumption. Blind to which
  token is which (a permutation costs nothing); symmetric; at most 2. Taken as in the paper and TRL GOLD.
- `hybrid`: TRL GOLD's `_compute_hybrid_uld_loss`: on vocabulary entries that stand for the same bytes
  (vocab_map.exact_matches; GOLD pairs strings, here bytes, so SentencePiece "▁the" meets byte-level
  "Ġthe"), the divergence `divergence` (forward KL / reverse KL / JSD_beta, kd/train/losses.py's conventions);
  on the rest, ULD. Weights: GOLD's adaptive matched share of the teacher's vocabulary (w_m = M / Vt,
  w_u = 1 - w_m) unless `matched_weight` is given. Departure from GOLD: the divergences are the *generalized*
  ones for measures that need not sum to 1 (KL(p||q) = sum p log(p/q) - p + q; for JSD the extra terms cancel):
  merged measures and their matched parts do not sum to 1, and the plain formula can go negative on them.
  Both are equal when p and q sum to 1.
- `projection`: X-Token (NVIDIA 2026; NeMo RL `xtoken_off_policy_distillation`): the student measure is
  projected into the teacher's vocabulary through the sparse re-tokenization matrix (vocab_map.build_projection:
  q = m_s W), then forward KL over the teacher's top-k entries plus one tail bucket (the teacher's mass off its
  top-k against the projected mass off it), generalized as above. With k = Vt it is the full forward KL; with
  k < Vt a lower bound (data-processing inequality), like kd.train.losses.SPARSE_EXACTNESS. The projected q can be
  0 where the teacher is not; log q is floored at 1e-30 there (X-Token adds an epsilon too).

End of an assistant turn (chat data, `end_of_turn`, default on): the groups compare only message contents; each
side's end-of-turn markup has no counterpart in the other's vocabulary, but both models say how likely the turn
ends there. Per trained assistant turn end (kd/cross_tokenizer/chat.py), from the position after the last content
group, the event E = "the content's remaining bytes (none, unless a token straddles the content's end), then the
end-of-turn markup begins", on each side through its own tokens up to and including the first token that reaches
past the content's end: the teacher's `<|im_end|>` (SmolLM2), a Qwen2 student's own `<|im_end|>`, a GPT-2 student
reading the template as text its first markup token (`<`, or `.<` when the answer's final `.` merges with it).
p = exp(sum of those tokens' realized log-probs at T) (the chain rule, merge.py), and the term is

    D_eot = KL(Bern(p_t) || Bern(p_s)) = p_t log(p_t/p_s) + (1-p_t) log((1-p_t)/(1-p_s))   (group_eval.py)

added to D's sum, each turn end one more unit of D's mean (with a normalizer N, the step's trained student tokens,
it is divided by N like a group: the student's end-of-turn token is one of those N). For a text-markup student
only the *first* markup token is taken, not the chain rule over the whole markup (`<|im_end|>` is 7 GPT-2 tokens):
the first token is where "stop" and "go on" part (once a student has emitted `<`, the rest of the markup is a
near-certain continuation), it is the one position both sides predict from the same content prefix, and the event
stays one token on both sides for a student with a real end-of-turn token. The markup's later tokens are trained by
nothing here (nor by the CE). With alpha > 0 the
CE also covers the event's student tokens (markup is otherwise left out of it). Identity: 0 (p_t = p_s).

Chunking (DESIGN: no (tokens, vocab) logits on either side), the pattern of kd.train.losses.fused_linear_kd_loss:
one autograd Function computes the loss and its gradients in the forward, in three chunked passes (realized-
token log-probs of both sides; `chunk_size` groups' distributions at their first tokens, D differentiated by
local autograd on that chunk only; `token_chunk_size` tokens' dL/dlogits for the chain rule's scalars and the
CE), folding each chunk's dL/dlogits into one grad_weight (V, H) and grad_hidden (N, H) at once; backward only
scales them. The teacher's top-k and tail come from kd.train.losses.sparse_teacher_targets, its realized-token
log-probs from kd.train.losses.iter_logit_chunks (merge.py). Measured: bench/cross_tokenizer_loss.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.cross_tokenizer.group_eval import end_of_turn_index, group_binary_kl, turn_end_logprobs
from kd.cross_tokenizer.merge import compute_dtype, group_index, later_token_sums, realized_logprobs
from kd.cross_tokenizer.settings import CrossTokenizerLoss
from kd.cross_tokenizer.vocab_map import Projection, VocabMap
from kd.train.losses import DIVERGENCES, KDLossOutput, sparse_teacher_targets

KINDS = ("uld", "hybrid", "projection")
_LOG_FLOOR = math.log(1e-30)


@dataclass(frozen=True)
class Side:
    """One side of one sequence. hidden (N, H): row j predicts ids[j]; weight (V, H) the output matrix (cut to
    the tokenizer's rows if the model pads); bounds (G+1,) group boundaries over the N tokens (align.py)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    ids: torch.Tensor
    bounds: torch.Tensor
    bias: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- pure pieces


def uld_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """ULD (Boizard et al. 2024): p (..., Vp), q (..., Vq) non-negative -> (...) L1 between the two sorted in
    descending order, the shorter zero-padded (computed without materializing the padding)."""
    a = p.sort(dim=-1, descending=True).values
    b = q.sort(dim=-1, descending=True).values
    m = min(a.shape[-1], b.shape[-1])
    return (a[..., :m] - b[..., :m]).abs().sum(-1) + a[..., m:].sum(-1) + b[..., m:].sum(-1)


def _xlogy_ratio(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """p * (lp - lq), 0 where p = 0 (so -inf log-measures do not give nan)."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))


def generalized_divergence(lt: torch.Tensor, ls: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """lt, ls (..., M) log-measures of teacher p and student q (need not sum to 1) -> (...) D(p, q):
    forward_kl sum p log(p/q) - p + q; reverse_kl the same with p, q swapped; jsd (Agarwal et al. 2024, GKD)
    beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q, beta = 0 / 1 being forward / reverse KL as in
    kd.train.losses. Equal to kd.train.losses' divergences when p and q sum to 1."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    p, q = lt.exp(), ls.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return (_xlogy_ratio(p, lt, ls) - p + q).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return (_xlogy_ratio(q, ls, lt) - q + p).sum(-1)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), dim=0)
    return beta * _xlogy_ratio(p, lt, lm).sum(-1) + (1.0 - beta) * _xlogy_ratio(q, ls, lm).sum(-1)


def hybrid_distance(lt: torch.Tensor, ls: torch.Tensor, t_matched: torch.Tensor, s_matched: torch.Tensor,
                    *, divergence: str, beta: float, matched_weight: float) -> torch.Tensor:
    """lt (g, Vt), ls (g, Vs) log-measures; t_matched[m] and s_matched[m] the same bytes -> (g,) TRL GOLD's hybrid:
    matched_weight * D(matched entries) + (1 - matched_weight) * ULD(all other entries)."""
    d = generalized_divergence(lt[:, t_matched], ls[:, s_matched], divergence, beta)
    t_rest = torch.ones(lt.shape[1], dtype=torch.bool, device=lt.device)
    s_rest = torch.ones(ls.shape[1], dtype=torch.bool, device=ls.device)
    t_rest[t_matched], s_rest[s_matched] = False, False
    if matched_weight == 1.0:
        return d
    return matched_weight * d + (1.0 - matched_weight) * uld_distance(lt[:, t_rest].exp(), ls[:, s_rest].exp())


def projection_distance(lt_ids: torch.Tensor, lt_top: torch.Tensor, lt_tail: torch.Tensor, ls: torch.Tensor,
                        proj_t: torch.Tensor) -> torch.Tensor:
    """Teacher top-k (ids (g, k), log-measure (g, k), log tail (g,)), student log-measure ls (g, Vs), proj_t the
    (Vt, Vs) sparse projection transposed -> (g,) generalized forward KL over the k + 1 buckets (X-Token)."""
    q = torch.sparse.mm(proj_t, ls.exp().t()).t()  # (g, Vt): the student measure in the teacher's vocabulary
    q_top = q.gather(1, lt_ids)
    q_tail = (q.sum(-1) - q_top.sum(-1)).clamp_min(0.0)
    lq = torch.cat([q_top, q_tail.unsqueeze(1)], dim=1).clamp_min(1e-30).log().clamp_min(_LOG_FLOOR)
    lp = torch.cat([lt_top, lt_tail.unsqueeze(1)], dim=1)
    p = lp.exp()
    return (_xlogy_ratio(p, lp, lq) - p + lq.exp()).sum(-1)


# ---------------------------------------------------------------------------------------------- chunked loss


def _group_divergence(ls, zt, t_later, *, temperature, kind, top_k, divergence, beta, t_matched, s_matched,
                      matched_weight, proj_t):
    """ls (g, Vs) the student's merged log-measure, zt (g, Vt) the teacher's logits at the groups' first tokens,
    t_later (g,) the teacher's later-token sums -> (g,) D by kind."""
    with torch.no_grad():
        if kind == "projection":
            ids, top, tail = sparse_teacher_targets(zt, top_k, temperature)
            top, tail = top + t_later.unsqueeze(1), tail + t_later
        else:
            lt = F.log_softmax(zt / temperature, -1) + t_later.unsqueeze(1)
    if kind == "projection":
        return projection_distance(ids, top, tail, ls, proj_t)
    if kind == "uld":
        return uld_distance(lt.exp(), ls.exp())
    return hybrid_distance(lt, ls, t_matched, s_matched, divergence=divergence, beta=beta,
                           matched_weight=matched_weight)


@dataclass
class _Plan:
    """Everything the fused function needs besides the student's differentiable tensors."""

    s_ids: torch.Tensor
    sb: torch.Tensor
    teacher: Side
    tb: torch.Tensor
    groups: torch.Tensor  # (n_groups,) the counted groups
    token_keep: torch.Tensor  # (N,) bool: student tokens of counted groups (and of counted turn ends)
    eot: tuple | None  # (student tokens, their turn end, teacher tokens, their turn end, E) or None
    alpha: float
    temperature: float
    ce_den: float
    d_den: float
    cfg: CrossTokenizerLoss
    div_kw: dict


def _linear(h, w, b, dt):
    return F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt))


def _fused_forward(hs, ws, bs, plan: _Plan, want_grad: bool):
    """The loss, its CE and D sums, and (when want_grad) dL/d(hs, ws, bs), in three chunked passes:
    1. realized-token log-probs of both sides (merge.py) -> each group's later-token sums;
    2. per chunk of groups: the student's (g, Vs) logits at the groups' first tokens, D by local autograd
       (sorts, sparse projection), folded into grad_weight / grad_hidden rows at once; dL/d(later-token sum);
    3. per chunk of tokens: dL/dlogits of the realized-token log-probs (the chain rule's scalars at T and the
       CE at 1), folded the same way. Only one chunk of logits is alive at a time; one (V, H) grad buffer."""
    dt, T, cfg, t = compute_dtype(hs), plan.temperature, plan.cfg, plan.teacher
    s_lp, s_lp1 = realized_logprobs(hs, ws, plan.s_ids, temperature=T, bias=bs, chunk_size=cfg.token_chunk_size)
    t_lp, _ = realized_logprobs(t.hidden, t.weight, t.ids, temperature=T, bias=t.bias, chunk_size=cfg.token_chunk_size)
    s_later, t_later = later_token_sums(s_lp, plan.sb), later_token_sums(t_lp, plan.tb)
    ce_sum = -(s_lp1 * plan.token_keep).sum()
    w_d = (1.0 - plan.alpha) * T**2 / plan.d_den
    e_sum, g_eot = _turn_end_term(s_lp, t_lp, plan.eot, w_d, want_grad)
    grad_h = torch.zeros(hs.shape, dtype=dt, device=hs.device) if want_grad else None
    grad_w = torch.zeros(ws.shape, dtype=dt, device=ws.device) if want_grad else None
    grad_b = None if bs is None or not want_grad else torch.zeros(bs.shape, dtype=dt, device=bs.device)
    g_later = torch.zeros(len(plan.sb) - 1, dtype=dt, device=hs.device)  # dL/d(each group's later-token sum)
    w = ws.to(dt)

    def fold(dz, h_rows, rows):
        grad_w.addmm_(dz.t(), h_rows)
        grad_h.index_add_(0, rows, dz @ w)
        if grad_b is not None:
            grad_b.add_(dz.sum(0))

    d_sum = e_sum.to(dt)
    for c in range(0, len(plan.groups), cfg.chunk_size):
        g = plan.groups[c:c + cfg.chunk_size]
        rows = plan.sb[g]
        h_rows = hs.index_select(0, rows).to(dt)
        zt = _linear(t.hidden.index_select(0, plan.tb[g]), t.weight, t.bias, dt)
        with torch.enable_grad():
            z = _linear(h_rows, ws, bs, dt).requires_grad_(want_grad)
            sl = s_later[g].clone().requires_grad_(want_grad)
            d = _group_divergence(F.log_softmax(z / T, -1) + sl.unsqueeze(1), zt, t_later[g], **plan.div_kw)
            if want_grad:
                dz, dsl = torch.autograd.grad(d.sum() * w_d, [z, sl])
        d_sum += d.detach().sum()
        if want_grad:
            fold(dz, h_rows, rows)
            g_later[g] = dsl
    if want_grad:
        later = torch.ones(len(plan.s_ids), dtype=torch.bool, device=hs.device)
        later[plan.sb[:-1]] = False
        a_t = torch.where(later, g_later[group_index(plan.sb)], torch.zeros((), dtype=dt, device=hs.device))
        a_t = (a_t if g_eot is None else a_t + g_eot) / T
        a_1 = -plan.alpha / plan.ce_den * plan.token_keep.to(dt)
        for c in range(0, len(plan.s_ids), cfg.token_chunk_size):
            rows = torch.arange(c, min(c + cfg.token_chunk_size, len(plan.s_ids)), device=hs.device)
            h_rows = hs[c:c + cfg.token_chunk_size].to(dt)
            z = _linear(h_rows, ws, bs, dt)
            at, a1 = a_t[rows].unsqueeze(1), a_1[rows].unsqueeze(1)
            # d lp_T / dz = (onehot - softmax(z/T)) / T;  d lp_1 / dz = onehot - softmax(z)
            dz = -(at * F.softmax(z / T, -1) + a1 * F.softmax(z, -1))
            dz.scatter_add_(1, plan.s_ids[rows].unsqueeze(1), at + a1)
            fold(dz, h_rows, rows)
    loss = plan.alpha * ce_sum / plan.ce_den + w_d * d_sum
    return loss, ce_sum, d_sum, (grad_h, grad_w, grad_b)


def _turn_end_term(s_lp, t_lp, eot, w_d: float, want_grad: bool):
    """The end-of-turn term (module docstring): its sum of KL(Bern(p_t) || Bern(p_s)) over the turn ends and, when
    want_grad, dL/d(each student token's realized log-prob at T) (N,); (0, None) without turn ends."""
    if eot is None:
        return s_lp.new_zeros(()), None
    ls, lt = turn_end_logprobs(s_lp, t_lp, eot)
    with torch.enable_grad():
        ls = ls.detach().requires_grad_(want_grad)
        kl = group_binary_kl(lt, ls)
        if not want_grad:
            return kl.detach().sum(), None
        (d_ls,) = torch.autograd.grad(kl.sum() * w_d, [ls])
    return kl.detach().sum(), s_lp.new_zeros(s_lp.shape).index_add(0, eot[0], d_ls[eot[1]].to(s_lp.dtype))


class _FusedCrossTokenizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, plan):
        want = any(ctx.needs_input_grad[:3])
        loss, ce_sum, d_sum, grads = _fused_forward(hs.detach(), ws.detach(), None if bs is None else bs.detach(),
                                                    plan, want)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ctx.save_for_backward(*[torch.empty(0) if x is None else x for x in grads])
        ctx.has_bias = bs is not None
        ce, d = ce_sum / plan.ce_den, d_sum / plan.d_den
        ctx.mark_non_differentiable(ce, d)
        return loss, ce, d

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_d):
        gh, gw, gb = ctx.saved_tensors
        need = ctx.needs_input_grad
        return ((gh * g_loss).to(ctx.dtypes[0]) if need[0] else None,
                (gw * g_loss).to(ctx.dtypes[1]) if need[1] else None,
                (gb * g_loss).to(ctx.dtypes[2]) if ctx.has_bias and need[2] else None, None)


def cross_tokenizer_kd_loss(student: Side, teacher: Side, cfg: CrossTokenizerLoss, *, alpha: float,
                            temperature: float, vocab_map: VocabMap | None = None,
                            projection: Projection | None = None, group_mask: torch.Tensor | None = None,
                            normalizer: float | None = None, end_of_turn: tuple | None = None) -> KDLossOutput:
    """alpha * CE(student) + (1 - alpha) * T^2 * D over aligned groups (module docstring for D by cfg.kind).

    student/teacher: Side with the same number of groups G; group_mask (G,) bool: groups that count (the CE
    counts the student tokens of those groups). The sums are divided by the counted groups (D) and student
    tokens (CE), or both by `normalizer`. `end_of_turn`: (student (E, 2), teacher (E, 2)) token ranges of assistant
    turn ends (BatchPlan.eot_s / eot_t), the binary KL term of the module docstring when cfg.end_of_turn; each turn
    end is one more unit of D's mean and its student tokens join the CE. No counted group nor turn end: loss 0 with
    zero gradients. `vocab_map` is needed
    for kind=hybrid, `projection` for kind=projection. Gradients reach student.hidden / weight / bias (computed
    during the forward, chunk by chunk, as kd.train.losses.fused_linear_kd_loss does); the teacher is detached."""
    if not 0.0 <= alpha <= 1.0 or not temperature > 0:
        raise ValueError(f"alpha must be in [0, 1] and temperature > 0, got {alpha}, {temperature}")
    g_total = len(student.bounds) - 1
    if len(teacher.bounds) - 1 != g_total:
        raise ValueError(f"student has {g_total} groups, teacher {len(teacher.bounds) - 1}")
    sb, tb = student.bounds.long(), teacher.bounds.long()
    if int(sb[-1]) != len(student.ids) or int(tb[-1]) != len(teacher.ids):
        raise ValueError("bounds must end at each side's number of tokens")
    keep = torch.ones(g_total, dtype=torch.bool, device=sb.device) if group_mask is None else group_mask.bool()
    div_kw: dict = {"temperature": temperature, "kind": cfg.kind, "top_k": cfg.top_k, "divergence": cfg.divergence,
                    "beta": cfg.beta, "t_matched": None, "s_matched": None, "matched_weight": 1.0, "proj_t": None}
    if cfg.kind == "hybrid":
        if vocab_map is None:
            raise ValueError("kind=hybrid needs vocab_map (kd.cross_tokenizer.vocab_map.exact_matches)")
        div_kw.update(t_matched=torch.as_tensor(vocab_map.teacher_ids, device=sb.device),
                      s_matched=torch.as_tensor(vocab_map.student_ids, device=sb.device),
                      matched_weight=vocab_map.share if cfg.matched_weight is None else cfg.matched_weight)
        if vocab_map.student_size > student.weight.shape[0] or vocab_map.teacher_size > teacher.weight.shape[0]:
            raise ValueError(f"vocab_map is for {vocab_map.student_size} student / {vocab_map.teacher_size} teacher "
                             f"tokens, the output matrices have {student.weight.shape[0]} / {teacher.weight.shape[0]} rows")
    elif cfg.kind == "projection":
        if projection is None:
            raise ValueError("kind=projection needs projection (kd.cross_tokenizer.vocab_map.build_projection)")
        if (projection.student_size, projection.teacher_size) != (student.weight.shape[0], teacher.weight.shape[0]):
            raise ValueError(f"the projection maps {projection.student_size} student to {projection.teacher_size} "
                             f"teacher tokens, the output matrices have {student.weight.shape[0]} / "
                             f"{teacher.weight.shape[0]} rows: cut padding rows to the tokenizers' sizes")
        div_kw["proj_t"] = projection.matrix_t(compute_dtype(student.hidden), student.hidden.device)
    groups = keep.nonzero().squeeze(1)
    n_groups = int(groups.numel())
    token_keep = keep[group_index(sb)] if len(student.ids) else keep.new_zeros(0)
    eot = None
    if cfg.end_of_turn and end_of_turn is not None and end_of_turn[0].numel():
        eot = end_of_turn_index(end_of_turn[0].to(sb.device), end_of_turn[1].to(sb.device))
        token_keep = token_keep.clone()
        token_keep[eot[0]] = True  # the CE on the student's own end-of-turn tokens
    n_eot = 0 if eot is None else eot[4]
    if n_groups + n_eot == 0:  # a value of 0, still attached to the graph, with zero gradients
        zero = student.hidden[:0].sum() * 0.0 + student.weight[:0].sum() * 0.0
        return KDLossOutput(loss=zero, ce=zero.detach(), kd=zero.detach(), tokens=0)
    n_tokens = int(token_keep.sum())
    plan = _Plan(
        s_ids=student.ids.long(), sb=sb, tb=tb, groups=groups, token_keep=token_keep, eot=eot, alpha=alpha,
        teacher=Side(teacher.hidden.detach(), teacher.weight.detach(), teacher.ids.long(), tb,
                     None if teacher.bias is None else teacher.bias.detach()),
        temperature=temperature, cfg=cfg, div_kw=div_kw,
        ce_den=float(max(n_tokens, 1)) if normalizer is None else float(normalizer),
        d_den=float(n_groups + n_eot) if normalizer is None else float(normalizer),
    )
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    loss, ce, d = _FusedCrossTokenizer.apply(student.hidden, student.weight, student.bias, plan)
    return KDLossOutput(loss=loss, ce=ce, kd=d, tokens=n_groups + n_eot)
