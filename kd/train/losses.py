"""Knowledge-distillation losses: the per-token objective, a plain reference and a chunked fused-linear form.

    out = fused_linear_kd_loss(s_hidden, s_weight, t_hidden, t_weight, labels, alpha=0.3, temperature=4.0)
    out.loss.backward()            # grads reach s_hidden / s_weight (tied embeddings too)
    out.ce, out.kd, out.tokens     # detached metrics

Objective (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", sec. 2: soft targets at
temperature T, their gradients scaled by T^2), averaged over the tokens whose label != ignore_index:

    L = 1/|M| * sum_{i in M} [ alpha * CE(softmax(z_i), y_i) + (1 - alpha) * T^2 * D(p_i, q_i) ]

with z the student logits, t the teacher logits, q = softmax(z / T), p = softmax(t / T); CE is at T = 1.
An all-masked batch (|M| = 0) gives a loss of exactly 0 and zero gradients. `normalizer=N` replaces |M| by N
(the sum over this call's tokens divided by N): the training loops pass the number of trained tokens of the whole
optimizer step (every micro-batch, every rank; kd/train/loss_normalization.py), so each token weighs 1/N wherever it
lands, and the micro-batch losses add up to the step's loss. D is one of
    forward_kl   KL(p || q) = sum_v p (log p - log q)                       (Hinton et al. 2015)
    reverse_kl   KL(q || p) = sum_v q (log q - log p)                       (mode seeking; MiniLLM, Gu et al. 2024)
    jsd          JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                 (generalized JSD of Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD)).
                 Convention of TRL's `generalized_jsd_loss` and Liger's JSD: beta = 0 IS forward_kl and
                 beta = 1 IS reverse_kl (the formula above tends to 0 at both ends, only JSD_beta / beta and
                 JSD_beta / (1 - beta) tend to the KLs, so the two endpoints are defined as the KLs).

`valid_vocab` masks ids >= valid_vocab (tokenizer padding rows) out of both softmaxes, exactly as if those
logits were -inf; a label in that range is a ValueError. Teacher rows/columns beyond the student's V are cut.

`fused_linear_kd_loss` never materialises (N, V) logits, neither in forward nor backward: per token chunk it
computes the logits from hidden states and output matrices, turns them *in place* into dL/dlogits (elementwise
math runs on small row blocks, so the only vocab-sized buffers are one student and one teacher chunk), folds
that into grad_hidden (N, H), grad_weight (V, H) and grad_bias, and keeps only those for backward.
Measured by bench/kd_loss.py (2 CPU cores, H=896, V=151,936, N=2048, fp32 fwd+bwd, JSD, chunk 256): peak
828 MB over baseline (545 MB of it is grad_weight) vs 15,436 MB for the plain reference and 3,197 MB for
Liger's LigerFusedLinearJSDLoss; 47 s vs 154 s and 108 s. See bench/results/.

`fused_linear_sparse_kd_loss` is the offline-teacher form (kd.teacher_mode=offline): the teacher is a stored
top-k of log-probs plus a tail mass (kd/teacher_cache), the divergence runs over k+1 buckets, the student side
is the same chunked fused-linear computation; `SPARSE_EXACTNESS` says what is exact and what approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# Elementwise work runs on row blocks of about this many logits. CPU: one row at V=152k, so the ~5
# temporaries of the divergence math stay small and cache-resident (measured on 2 cores, 256x151936 JSD:
# 0.56 s at 2^18, 0.9 s at 2^21 elements per block). GPU: whole chunks, since kernel launches dominate there.
_BLOCK_ELEMS = {"cpu": 1 << 18}
_BLOCK_ELEMS_DEFAULT = 1 << 26


@dataclass
class KDLossOutput:
    """loss: scalar, differentiable. ce: detached mean CE (T=1). kd: detached mean divergence D, before the
    T^2 and (1 - alpha) weights. tokens: number of tokens with label != ignore_index. With `normalizer=N` the
    three are sums over this call's tokens divided by N (this call's share of an N-token mean)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    tokens: int


def _denominator(m: int, normalizer: float | None) -> float:
    """What a sum over the m counted tokens is divided by: m (a mean; 1 when m = 0), or the caller's normalizer."""
    if normalizer is None:
        return float(max(m, 1))
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return float(normalizer)


def _check_args(alpha: float, temperature: float, divergence: str, beta: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _effective_vocab(v_student: int, v_teacher: int, valid_vocab: int | None) -> int:
    """Columns that take part in the softmaxes: valid_vocab, or the student's V when None."""
    ve = v_student if valid_vocab is None else int(valid_vocab)
    if not 0 < ve <= v_student:
        raise ValueError(f"valid_vocab={valid_vocab} must be in 1..{v_student} (the student's vocab rows)")
    if v_teacher < ve:
        raise ValueError(f"teacher has {v_teacher} vocab rows, fewer than the {ve} the loss needs")
    return ve


def _check_labels(labels: torch.Tensor, ignore_index: int, ve: int, v_student: int) -> torch.Tensor:
    """Returns the (M,) indices of unmasked tokens; raises on labels outside 0..ve-1."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= ve))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        tok = int(labels[pos])
        why = f"a padding row (>= valid_vocab={ve})" if ve <= tok < v_student else f"outside 0..{ve - 1}"
        raise ValueError(f"label {tok} at position {pos} is {why}")
    return keep.nonzero().squeeze(1)


# --------------------------------------------------------------------------------------------------
# Reference: plain autograd on full logits (tests and benchmarks only).
# --------------------------------------------------------------------------------------------------


def _divergence_ref(ls: torch.Tensor, lt: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """ls, lt: (M, V) student/teacher log-probs at temperature T -> (M,) divergence D(p || q) per token.
    F.kl_div(input, target, log_target=True) = KL(target || input), as in TRL's generalized_jsd_loss."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
    kl_t = F.kl_div(log_m, lt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, ls, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    valid_vocab: int | None = None,
    normalizer: float | None = None,
) -> KDLossOutput:
    """Unchunked KD loss by plain autograd; holds full logits, so use it for tests and benchmarks only.

    student_logits (N, V); teacher_logits (N, Vt) with Vt >= V (cut to V columns); labels (N,) int.
    Columns >= valid_vocab are set to -inf in both before the softmaxes. Computes in float32, or float64
    when the logits are float64 (the tests' ground truth).
    """
    _check_args(alpha, temperature, divergence, beta)
    if student_logits.ndim != 2 or teacher_logits.ndim != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, V), (N, Vt) and labels (N,), got {tuple(student_logits.shape)}, "
            f"{tuple(teacher_logits.shape)}, {tuple(labels.shape)}"
        )
    v = student_logits.shape[1]
    ve = _effective_vocab(v, teacher_logits.shape[1], valid_vocab)
    idx = _check_labels(labels, ignore_index, ve, v)
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(dt)
    t = teacher_logits[:, :v].detach().to(dt)
    if ve < v:
        pad = torch.arange(v, device=z.device) >= ve
        z, t = z.masked_fill(pad, float("-inf")), t.masked_fill(pad, float("-inf"))
    if idx.numel() == labels.numel():  # nothing masked: no gather copies (keeps the benchmark's naive honest)
        zs, ts, ys = z, t, labels.long()
    else:
        zs, ts, ys = z[idx], t[idx], labels[idx].long()
    if idx.numel() == 0:
        zero = zs.sum() * 0.0  # empty sum: value 0, gradient 0, still attached to the graph
        return KDLossOutput(loss=zero, ce=zero.detach(), kd=zero.detach(), tokens=0)
    ce = F.cross_entropy(zs, ys, reduction="none")
    ls = F.log_softmax(zs / temperature, dim=-1)[:, :ve]  # masked columns are -inf: leave them out of sums
    lt = F.log_softmax(ts / temperature, dim=-1)[:, :ve]
    d = _divergence_ref(ls, lt, divergence, beta)
    denom = _denominator(idx.numel(), normalizer)
    loss = (alpha * ce + (1.0 - alpha) * temperature**2 * d).sum() / denom
    return KDLossOutput(loss=loss, ce=ce.sum().detach() / denom, kd=d.sum().detach() / denom,
                        tokens=int(idx.numel()))


# --------------------------------------------------------------------------------------------------
# Fused-linear chunked form.
# --------------------------------------------------------------------------------------------------


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(b, V), (b, V) -> (b,) row-wise dot product without a (b, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _rows_to_grad_(z, t, y, alpha: float, temp: float, divergence: str, beta: float):
    """In place: student logits z (b, V) fp32 -> dl/dz for the per-token loss l = alpha*CE + (1-alpha)*T^2*D.
    t (b, V) teacher logits, y (b,) labels. Returns (sum of CE, sum of D) over the b rows.

    Gradients (q = softmax(z/T), p = softmax(t/T), dD/dz = (1/T) dD/d(z/T)):
      CE:          softmax(z) - onehot(y)
      forward_kl:  dD/d(z/T) = q - p
      reverse_kl:  dD/d(z/T) = q * (log q - log p - D)
      jsd:         dD/d(z/T) = (1 - beta) q * (a - sum_v q a),  a = log q - log m
    Written for few passes and few exp/log (the CPU cost here): 3 exps per logit, +1 log for jsd.
    """
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    m1 = z.amax(1, keepdim=True)
    lq = z - m1
    e = lq.exp()
    s1 = e.sum(1, keepdim=True)
    ce = (m1 + s1.log() - z.gather(1, y[:, None])).squeeze(1)
    torch.mul(e, alpha / s1, out=z)  # z no longer needed: it becomes alpha * (softmax(z) - onehot(y))
    z.scatter_add_(1, y[:, None], torch.full_like(s1, -alpha))
    if temp != 1.0:
        lq.mul_(1.0 / temp)
        torch.exp(lq, out=e)
        s1 = e.sum(1, keepdim=True)
    q = e.div_(s1)
    lq.sub_(s1.log())
    lp = t - t.amax(1, keepdim=True)
    if temp != 1.0:
        lp.mul_(1.0 / temp)
    p = lp.exp()
    st = p.sum(1, keepdim=True)
    p.div_(st)
    lp.sub_(st.log())
    c = (1.0 - alpha) * temp  # (1-alpha) T^2 * dD/dz = (1-alpha) T * dD/d(z/T)
    if divergence == "forward_kl":
        d = _rowdot(p, lp.sub_(lq))
        z.add_(q.sub_(p), alpha=c)
    elif divergence == "reverse_kl":
        a = lq.sub_(lp)
        d = _rowdot(q, a)
        z.addcmul_(a.sub_(d[:, None]), q, value=c)
    else:
        # log m in probability space; clamping at `tiny` only touches entries where p and q both underflow,
        # whose terms are 0 * finite.
        log_m = torch.mul(p, beta).add_(q, alpha=1.0 - beta).clamp_min_(torch.finfo(z.dtype).tiny).log_()
        d_t = _rowdot(p, lp.sub_(log_m))
        a = lq.sub_(log_m)
        s = _rowdot(q, a)
        d = beta * d_t + (1.0 - beta) * s
        z.addcmul_(a.sub_(s[:, None]), q, value=c * (1.0 - beta))
    return ce.sum(), d.sum()


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out (n, V) accumulation dtype <- h (n, H) @ w (V, H)^T + b, the matmul in w's dtype."""
    h = h.to(w.dtype)
    if out.dtype == w.dtype:
        torch.mm(h, w.t(), out=out)
    else:  # bf16/fp16 weights: low-precision matmul, softmax math in fp32
        out.copy_(torch.mm(h, w.t()))
    if b is not None:
        out.add_(b.to(out.dtype))


class _FusedKDFunction(torch.autograd.Function):
    """What the dense and the sparse fused losses share: gradients are computed in forward (per chunk,
    so no [tokens, vocab] tensor outlives a chunk) and backward only scales them."""

    @staticmethod
    def start(h, w, b, need_h: bool, need_w: bool, need_b: bool):
        """Accumulation dtype, zeroed fp32 gradient buffers for the inputs that need one, CE and KD sums."""
        acc, dev = torch.promote_types(w.dtype, torch.float32), h.device
        grad_h = torch.zeros(h.shape, dtype=acc, device=dev) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=dev) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=acc, device=dev) if need_b else None
        ce_sum, kd_sum = (torch.zeros((), dtype=acc, device=dev) for _ in range(2))
        return acc, grad_h, grad_w, grad_b, ce_sum, kd_sum

    @staticmethod
    def finish(ctx, ce_sum, kd_sum, denom: float, alpha: float, temp: float, grads: tuple, inputs: tuple):
        """Sums / denom (the token mean, or the caller's normalizer), the combined loss, the gradients kept."""
        ce_mean, kd_mean = ce_sum / denom, kd_sum / denom
        loss = alpha * ce_mean + (1.0 - alpha) * temp**2 * kd_mean
        ctx.grads = tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs))
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return loss, ce_mean, kd_mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads, ctx.grads = ctx.grads, None  # drop ctx's reference so autograd can adopt the tensors
        if grad_loss is not None and bool(grad_loss.ne(1)):
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return (*grads, None, None, None, None, None, None)


class _FusedLinearKD(_FusedKDFunction):
    """(h, w, b, ht, wt, bt, idx, labels, cfg) -> (loss, ce, kd); grads computed in forward, kept for backward."""

    @staticmethod
    def forward(ctx, h, w, b, ht, wt, bt, idx, labels, cfg):
        alpha, temp, divergence, beta, ve, chunk, normalizer = cfg
        n_all, m = h.shape[0], idx.numel()
        denom = _denominator(m, normalizer)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc, grad_h, grad_w, grad_b, ce_sum, kd_sum = _FusedKDFunction.start(h, w, b, need_h, need_w, need_b)
        dev = h.device
        if m:
            dense = m == n_all  # no masked tokens: slice instead of gathering copies
            hv = h if dense else h.index_select(0, idx)
            htv = ht if dense else ht.index_select(0, idx)
            yv = labels.long() if dense else labels.index_select(0, idx).long()
            ws, wts = w[:ve], wt[:ve]
            bs = b[:ve] if b is not None else None
            bts = bt[:ve] if bt is not None else None
            c = min(chunk, m)
            # The only vocab-sized buffers: reused for every chunk (the last one uses a prefix view).
            zbuf = torch.empty(c, ve, dtype=acc, device=dev)
            tbuf = torch.empty(c, ve, dtype=acc, device=dev)
            low = w.dtype != acc
            gw_tmp = torch.empty(ws.shape, dtype=w.dtype, device=dev) if (need_w and low) else None
            rows = max(1, _BLOCK_ELEMS.get(dev.type, _BLOCK_ELEMS_DEFAULT) // ve)
            for s in range(0, m, c):
                n = min(c, m - s)
                z, t, hc, y = zbuf[:n], tbuf[:n], hv[s : s + n], yv[s : s + n]
                _logits_into(z, hc, ws, bs)
                _logits_into(t, htv[s : s + n], wts, bts)
                for r in range(0, n, rows):
                    zr, tr, yr = z[r : r + rows], t[r : r + rows], y[r : r + rows]
                    ce_r, kd_r = _rows_to_grad_(zr, tr, yr, alpha, temp, divergence, beta)
                    ce_sum += ce_r
                    kd_sum += kd_r
                z.mul_(1.0 / denom)  # dL/dz of the token sum / denom
                zc = z.to(w.dtype) if low else z
                if need_h:
                    gh = torch.mm(zc, ws)
                    if dense:
                        grad_h[s : s + n] = gh
                    else:
                        grad_h.index_copy_(0, idx[s : s + n], gh.to(acc))
                if need_w:
                    if low:  # chunk product in bf16 (fp32 accumulate inside the GEMM), sum over chunks in fp32
                        grad_w[:ve].add_(torch.mm(zc.t(), hc.to(w.dtype), out=gw_tmp))
                    else:
                        grad_w[:ve].addmm_(zc.t(), hc.to(w.dtype))
                if need_b:
                    grad_b[:ve].add_(z.sum(0))
            del zbuf, tbuf, gw_tmp
        return _FusedKDFunction.finish(ctx, ce_sum, kd_sum, denom, alpha, temp, (grad_h, grad_w, grad_b), (h, w, b))



def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    valid_vocab: int | None = None,
    chunk_size: int = 256,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> KDLossOutput:
    """KD loss from hidden states and output matrices, in token chunks; no (N, V) logits ever exist.

    student_hidden (N, H) [or (..., H), flattened]; student_weight (V, H); teacher_hidden (N, Ht);
    teacher_weight (Vt, Ht) with Vt >= V (rows beyond V are cut); labels (N,) [or (...)];
    student_bias / teacher_bias (V,) / (Vt,) or None. Same value as `kd_loss_reference` on the logits.

    Gradients flow to student_hidden, student_weight and student_bias through a custom autograd Function
    (grads computed chunk by chunk in forward and kept; backward only scales them by the incoming grad,
    and skips even that when it is 1). A weight that is also the input embedding (tied, Qwen2.5-0.5B)
    gets the sum of both contributions by normal autograd accumulation. The teacher gets no gradient.
    Matmuls run in the weight's dtype (fp32 or bf16); softmax and accumulation in fp32.
    Peak extra memory ~ 2 * chunk_size * V * 4 bytes + one fp32 (V, H) gradient (+ a bf16 one for bf16).
    """
    _check_args(alpha, temperature, divergence, beta)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    y = labels.reshape(-1)
    if not (h.shape[0] == ht.shape[0] == y.shape[0]):
        raise ValueError(f"token counts differ: student {h.shape[0]}, teacher {ht.shape[0]}, labels {y.shape[0]}")
    if student_weight.shape[1] != h.shape[1] or teacher_weight.shape[1] != ht.shape[1]:
        raise ValueError(
            f"hidden sizes differ from the output matrices: student {tuple(h.shape)} vs {tuple(student_weight.shape)}, "
            f"teacher {tuple(ht.shape)} vs {tuple(teacher_weight.shape)}"
        )
    v = student_weight.shape[0]
    ve = _effective_vocab(v, teacher_weight.shape[0], valid_vocab)
    idx = _check_labels(y, ignore_index, ve, v)
    cfg = (float(alpha), float(temperature), divergence, float(beta), ve, int(chunk_size),
           None if normalizer is None else float(normalizer))
    w, b = student_weight, student_bias
    if not torch.is_grad_enabled():  # eval under no_grad: skip computing (and holding) the gradients
        h, w, b = h.detach(), w.detach(), None if b is None else b.detach()
    loss, ce, kd = _FusedLinearKD.apply(
        h, w, b, ht.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), idx, y, cfg,
    )
    return KDLossOutput(loss=loss, ce=ce, kd=kd, tokens=int(idx.numel()))


@torch.no_grad()
def iter_logit_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    valid_vocab: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits) for rows start..start+n of hidden (N, H) @ weight (V, H)^T + bias, as fp32
    (n, V') tensors, V' = valid_vocab or V, under no_grad: eval-time log-probs without (N, V) logits.

        for start, logits in iter_logit_chunks(h, w, chunk_size=256):
            nll[start:start + len(logits)] = F.cross_entropy(logits, y[start:start + len(logits)], reduction="none")

    Each chunk is a fresh tensor (safe to keep), so keep as few as you can.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    ve = weight.shape[0] if valid_vocab is None else int(valid_vocab)
    w = weight[:ve]
    b = None if bias is None else bias[:ve]
    acc = torch.promote_types(weight.dtype, torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        hc = hidden[s : s + chunk_size]
        out = torch.empty(hc.shape[0], ve, dtype=acc, device=hidden.device)
        _logits_into(out, hc, w, b)
        yield s, out


# --------------------------------------------------------------------------------------------------
# Sparse (offline) teacher: stored top-k log-probs plus a tail bucket.
# --------------------------------------------------------------------------------------------------

# What the sparse loss computes, recorded in every teacher-cache manifest (kd/teacher_cache) and run manifest.
SPARSE_EXACTNESS = {
    "objective": "alpha*CE(student, label) + (1-alpha)*T^2*D(P, Q) over k+1 buckets: the teacher's top-k ids "
    "one by one, every other valid id pooled in one tail bucket (P_tail stored, Q_tail = student mass off the top-k)",
    "cross_entropy": "exact (student only)",
    "k_equals_vocab": "exact for every divergence and any T: there is no tail, D is the full divergence",
    "forward_kl": "k < vocab: a lower bound of KL(p||q) (data-processing inequality); equal when the student's "
    "tail is proportional to the teacher's. Its gradient is exact on the top-k ids and matches the tail's total",
    "reverse_kl": "k < vocab: a lower bound of KL(q||p), same bucket argument; approximate on tail ids",
    "jsd": "k < vocab: a lower bound of JSD_beta (bucketed); approximate on tail ids",
    "temperature": "the cache holds log softmax(teacher_logits / T_cache) over the valid vocab; training at "
    "T == T_cache is as above; T != T_cache is exact only when k == vocab (rescaled) and refused otherwise",
    "quantisation": "lossy encodings add their own error, measured in bench/results/teacher_cache-*.json",
}


@torch.no_grad()
def sparse_teacher_targets(
    logits: torch.Tensor, k: int, temperature: float, valid_vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits (n, V) -> (ids (n, k') int64, log-probs (n, k'), log tail mass (n,)) at T, fp32 or fp64.

    k' = min(k, valid_vocab); log-probs are log softmax(logits[:, :valid_vocab] / T) of the top-k' ids, in
    descending order; the tail is log of the probability on every other valid id (-inf when k' covers
    the vocab), computed by a logsumexp over those ids (no 1 - sum cancellation).
    """
    ve = logits.shape[1] if valid_vocab is None else int(valid_vocab)
    lp = F.log_softmax(logits[:, :ve].to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    kk = min(int(k), ve)
    vals, ids = lp.topk(kk, dim=-1)
    if kk == ve:
        return ids, vals, torch.full((lp.shape[0],), float("-inf"), dtype=lp.dtype, device=lp.device)
    lp.scatter_(1, ids, float("-inf"))
    return ids, vals, torch.logsumexp(lp, dim=-1)


def _sparse_rows_to_grad_(z, tid, tlp, ttail, y, alpha, temp, t_cache, divergence, beta, has_tail):
    """In place: student logits z (b, V) fp32 -> dl/dz for l = alpha*CE + (1-alpha)*T^2*D over k+1 buckets.
    tid (b, k) teacher ids, tlp (b, k) their log-probs at t_cache, ttail (b,) log tail mass. Returns (sum CE, sum D).

    With Q_c / P_c the student / teacher bucket masses and c(j) the bucket of id j, every divergence has
    dD/du_j = q_j * h_{c(j)} (u = z/T, q = softmax(u)):
      forward_kl  h_c = 1 - P_c/Q_c   (so q_j - p_j on the top-k ids)
      reverse_kl  h_c = log Q_c - log P_c - D
      jsd         h_c = (1 - beta) (a_c - sum_c Q_c a_c),  a_c = log Q_c - log M_c,  M = beta P + (1 - beta) Q
    """
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    # the teacher's buckets: rescaled to T (exact only with no tail, checked by the caller), then
    # normalised over the k+1 buckets so that quantised codes still give a distribution
    lp = tlp.to(z.dtype) if temp == t_cache else tlp.to(z.dtype) * (t_cache / temp)
    lpt = ttail.to(z.dtype)[:, None] if has_tail else None
    lz = torch.logsumexp(torch.cat([lp, lpt], 1) if has_tail else lp, dim=1, keepdim=True)
    lp = lp - lz
    # CE at T = 1, as in the dense loss
    m1 = z.amax(1, keepdim=True)
    lq = z - m1
    e = lq.exp()
    s1 = e.sum(1, keepdim=True)
    ce = (m1 + s1.log() - z.gather(1, y[:, None])).squeeze(1)
    torch.mul(e, alpha / s1, out=z)
    z.scatter_add_(1, y[:, None], torch.full_like(s1, -alpha))
    if temp != 1.0:
        lq.mul_(1.0 / temp)
        torch.exp(lq, out=e)
        s1 = e.sum(1, keepdim=True)
    q = e.div_(s1)
    lq.sub_(s1.log())
    lq_k = lq.gather(1, tid)
    q_k = lq_k.exp()
    c = (1.0 - alpha) * temp
    if has_tail:
        q.scatter_(1, tid, 0.0)  # q now holds the tail ids only: their sum has no 1 - sum cancellation
        q_t = q.sum(1, keepdim=True).clamp_min_(torch.finfo(z.dtype).tiny)
        lq_t, lp_t = q_t.log(), lpt - lz
        p_t = lp_t.exp()
    p_k = lp.exp()
    if divergence == "forward_kl":
        d = (p_k * (lp - lq_k)).sum(1)
        g_k = q_k - p_k
        if has_tail:
            d = d + (p_t * (lp_t - lq_t)).squeeze(1)
            h_t = 1.0 - p_t / q_t
    elif divergence == "reverse_kl":
        d = (q_k * (lq_k - lp)).sum(1)
        if has_tail:
            d = d + (q_t * (lq_t - lp_t)).squeeze(1)
            h_t = lq_t - lp_t - d[:, None]
        g_k = q_k * (lq_k - lp - d[:, None])
    else:
        tiny = torch.finfo(z.dtype).tiny
        lm_k = (beta * p_k + (1.0 - beta) * q_k).clamp_min(tiny).log()
        a_k = lq_k - lm_k
        d = beta * (p_k * (lp - lm_k)).sum(1)
        s = (q_k * a_k).sum(1)
        if has_tail:
            lm_t = (beta * p_t + (1.0 - beta) * q_t).clamp_min(tiny).log()
            a_t = lq_t - lm_t
            d = d + beta * (p_t * (lp_t - lm_t)).squeeze(1)
            s = s + (q_t * a_t).squeeze(1)
            h_t = (1.0 - beta) * (a_t - s[:, None])
        d = d + (1.0 - beta) * s
        g_k = (1.0 - beta) * q_k * (a_k - s[:, None])
    if has_tail:
        z.addcmul_(q, h_t, value=c)  # tail ids; the top-k ids are 0 in q and get their term next
    z.scatter_add_(1, tid, g_k.mul_(c))
    return ce.sum(), d.sum()


class _FusedLinearSparseKD(_FusedKDFunction):
    """(h, w, b, tid, tlp, ttail, idx, labels, cfg) -> (loss, ce, kd); like _FusedLinearKD with a sparse teacher."""

    @staticmethod
    def forward(ctx, h, w, b, tid, tlp, ttail, idx, labels, cfg):
        alpha, temp, t_cache, divergence, beta, ve, chunk, has_tail, normalizer = cfg
        n_all, m = h.shape[0], idx.numel()
        denom = _denominator(m, normalizer)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc, grad_h, grad_w, grad_b, ce_sum, kd_sum = _FusedKDFunction.start(h, w, b, need_h, need_w, need_b)
        dev = h.device
        if m:
            dense = m == n_all
            pick = (lambda x: x) if dense else (lambda x: x.index_select(0, idx))
            hv, yv = pick(h), pick(labels).long()
            tidv, tlpv, ttv = pick(tid).long(), pick(tlp), pick(ttail)
            ws, bs = w[:ve], (b[:ve] if b is not None else None)
            c = min(chunk, m)
            zbuf = torch.empty(c, ve, dtype=acc, device=dev)  # the only vocab-sized buffer
            low = w.dtype != acc
            gw_tmp = torch.empty(ws.shape, dtype=w.dtype, device=dev) if (need_w and low) else None
            rows = max(1, _BLOCK_ELEMS.get(dev.type, _BLOCK_ELEMS_DEFAULT) // ve)
            for s in range(0, m, c):
                n = min(c, m - s)
                z, hc = zbuf[:n], hv[s : s + n]
                _logits_into(z, hc, ws, bs)
                for r in range(s, s + n, rows):
                    r1 = min(r + rows, s + n)
                    ce_r, kd_r = _sparse_rows_to_grad_(
                        z[r - s : r1 - s], tidv[r:r1], tlpv[r:r1], ttv[r:r1], yv[r:r1],
                        alpha, temp, t_cache, divergence, beta, has_tail)
                    ce_sum += ce_r
                    kd_sum += kd_r
                z.mul_(1.0 / denom)
                zc = z.to(w.dtype) if low else z
                if need_h:
                    gh = torch.mm(zc, ws)
                    if dense:
                        grad_h[s : s + n] = gh
                    else:
                        grad_h.index_copy_(0, idx[s : s + n], gh.to(acc))
                if need_w:  # in place, as in the dense loss: no (V, H) temporary per chunk
                    if low:
                        grad_w[:ve].add_(torch.mm(zc.t(), hc.to(w.dtype), out=gw_tmp))
                    else:
                        grad_w[:ve].addmm_(zc.t(), hc.to(w.dtype))
                if need_b:
                    grad_b[:ve].add_(z.sum(0))
            del zbuf, gw_tmp
        return _FusedKDFunction.finish(ctx, ce_sum, kd_sum, denom, alpha, temp, (grad_h, grad_w, grad_b), (h, w, b))



def fused_linear_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    cache_temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    valid_vocab: int | None = None,
    chunk_size: int = 256,
    student_bias: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> KDLossOutput:
    """KD loss against a stored sparse teacher (offline mode); the student side is chunked and fused-linear.

    student_hidden (N, H) [or (..., H)]; student_weight (V, H); teacher_ids (N, k) int, ids < valid_vocab, no
    repeats within a row; teacher_logprobs (N, k) log softmax(teacher_logits / cache_temperature) at those ids;
    teacher_log_tail (N,) log of the teacher mass on every other valid id (-inf when k == valid_vocab);
    labels (N,). Same masking, ignore_index, valid_vocab and label rules as `fused_linear_kd_loss`.

    The divergence runs over k+1 buckets (top-k ids + tail); what that makes exact or approximate is
    `SPARSE_EXACTNESS`. With k == valid_vocab and T == cache_temperature it equals `fused_linear_kd_loss`
    (value and gradients). The teacher buckets are renormalised, so quantised log-probs still form a
    distribution. Raises kd.errors.ConfigError for T != cache_temperature with a tail (its mass at another T
    is unknown). Peak extra memory ~ chunk_size * V * 4 bytes + one fp32 (V, H) gradient: no teacher logits.
    """
    from kd.errors import ConfigError

    _check_args(alpha, temperature, divergence, beta)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    h = student_hidden.reshape(-1, student_hidden.shape[-1])
    y = labels.reshape(-1)
    n = h.shape[0]
    if teacher_ids.ndim != 2 or teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != n \
            or teacher_log_tail.shape != (n,) or y.shape[0] != n:
        raise ValueError(
            f"expected hidden (N, H), teacher ids/log-probs (N, k), tail (N,), labels (N,); got {tuple(h.shape)}, "
            f"{tuple(teacher_ids.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(teacher_log_tail.shape)}, "
            f"{tuple(y.shape)}")
    if student_weight.shape[1] != h.shape[1]:
        raise ValueError(f"hidden size {h.shape[1]} differs from the output matrix {tuple(student_weight.shape)}")
    v = student_weight.shape[0]
    ve = _effective_vocab(v, v, valid_vocab)
    k = teacher_ids.shape[1]
    if not 0 < k <= ve:
        raise ValueError(f"teacher top-k must be in 1..{ve} (valid_vocab), got {k}")
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= ve):
        raise ValueError(f"teacher ids must be in 0..{ve - 1}, got {int(teacher_ids.min())}..{int(teacher_ids.max())}")
    has_tail = k < ve
    if has_tail and float(temperature) != float(cache_temperature):
        raise ConfigError(
            f"kd.temperature: {temperature:g} differs from the teacher cache's temperature {cache_temperature:g}; "
            f"with top-k {k} < vocab {ve} the tail mass at another temperature is unknown: rebuild the cache")
    idx = _check_labels(y, ignore_index, ve, v)
    cfg = (float(alpha), float(temperature), float(cache_temperature), divergence, float(beta), ve,
           int(chunk_size), has_tail, None if normalizer is None else float(normalizer))
    w, b = student_weight, student_bias
    if not torch.is_grad_enabled():
        h, w, b = h.detach(), w.detach(), None if b is None else b.detach()
    loss, ce, kd = _FusedLinearSparseKD.apply(
        h, w, b, teacher_ids.detach(), teacher_logprobs.detach(), teacher_log_tail.detach(), idx, y, cfg)
    return KDLossOutput(loss=loss, ce=ce, kd=kd, tokens=int(idx.numel()))
