"""Property tests for the offline (sparse top-k + tail) KD loss in kd/train/losses.py.

With k = vocab the offline loss and its gradients equal the online fused loss (rel 1e-5, fp32); with k < vocab
they equal autograd through the bucketed objective written out plainly; nonsense is refused.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.errors import ConfigError
from kd.train.losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss, sparse_teacher_targets
from tests.test_losses import DIV_BETA, close_to_ref, floors, problems, run_fused

FAST = settings(max_examples=8, deadline=None)


def teacher_logits(p, dtype=torch.float32):
    v = p["w"].shape[0]
    t = p["ht"].to(dtype) @ p["wt"].to(dtype).t() + (p["bt"].to(dtype) if "bt" in p else 0)
    return t[:, :v]


def run_sparse(p, k, *, dtype=torch.float32, cache_temperature=None, valid_vocab=None, **kw):
    t_cache = kw["temperature"] if cache_temperature is None else cache_temperature
    ids, lp, tail = sparse_teacher_targets(teacher_logits(p, dtype), k, t_cache, valid_vocab)
    h = p["h"].to(dtype, copy=True).requires_grad_()
    w = p["w"].to(dtype, copy=True).requires_grad_()
    b = p["b"].to(dtype, copy=True).requires_grad_() if "b" in p else None
    out = fused_linear_sparse_kd_loss(h, w, ids, lp.to(dtype), tail.to(dtype), p["y"], student_bias=b,
                                      cache_temperature=t_cache, valid_vocab=valid_vocab, **kw)
    out.loss.backward()
    return out, (h.grad, w.grad, None if b is None else b.grad)


@FAST
@given(p=problems(), db=DIV_BETA, alpha=st.floats(0, 1), temp=st.floats(0.5, 5.0), chunk=st.integers(1, 80),
       t_cache=st.sampled_from([None, 1.0, 2.5]))
def test_k_equal_vocab_matches_online_loss_and_gradients(p, db, alpha, temp, chunk, t_cache):
    kw = dict(alpha=alpha, temperature=temp, divergence=db[0], beta=db[1], chunk_size=chunk)
    v = p["w"].shape[0]
    so, sg = run_sparse(p, v, cache_temperature=t_cache, **kw)  # any cache temperature: rescaled exactly
    oo, og = run_fused(p, **kw)
    r64, g64 = run_fused(p, dtype=torch.float64, **kw)
    fl, fgs = floors(p, temp)
    assert so.tokens == oo.tokens
    for name in ("loss", "ce", "kd"):
        a, b, c = (getattr(o, name).detach() for o in (so, oo, r64))
        assert close_to_ref(a, b, c, atol=fl), (name, float(a), float(b))
    for a, b, c, f in zip(sg, og, g64, fgs):
        if a is not None:
            assert close_to_ref(a, b, c, atol=f)


def bucketed_reference(p, k, *, alpha, temperature, divergence, beta):
    """The documented objective, by plain float64 autograd over k+1 buckets."""
    h = p["h"].double().requires_grad_()
    w = p["w"].double().requires_grad_()
    ids, lp, tail = sparse_teacher_targets(teacher_logits(p, torch.float64), k, temperature)
    z = h @ w.t()
    keep = p["y"] != -100
    ce = torch.nn.functional.cross_entropy(z[keep], p["y"][keep], reduction="none")
    lq = torch.log_softmax(z / temperature, -1)
    qk = lq.gather(1, ids).exp()
    big_q = torch.cat([qk, (1 - qk.sum(1)).clamp_min(1e-300)[:, None]], 1)
    big_p = torch.cat([lp.exp(), tail.exp()[:, None]], 1)
    big_p = big_p / big_p.sum(1, keepdim=True)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        d = (big_p * (big_p.log() - big_q.log())).sum(1)
    elif divergence == "reverse_kl":
        d = (big_q * (big_q.log() - big_p.log())).sum(1)
    else:
        m = beta * big_p + (1 - beta) * big_q
        d = beta * (big_p * (big_p.log() - m.log())).sum(1) + (1 - beta) * (big_q * (big_q.log() - m.log())).sum(1)
    loss = (alpha * ce + (1 - alpha) * temperature**2 * d[keep]).mean() if bool(keep.any()) else z.sum() * 0
    loss.backward()
    return loss.detach(), (h.grad, w.grad)


@FAST
@given(p=problems(), db=DIV_BETA, alpha=st.floats(0, 1), temp=st.floats(0.5, 5.0), frac=st.floats(0.05, 0.9))
def test_top_k_with_tail_is_the_bucketed_objective(p, db, alpha, temp, frac):
    p = {k: v for k, v in p.items() if k not in ("b", "bt")}
    v = p["w"].shape[0]
    k = max(1, min(v - 1, int(frac * v))) if v > 1 else 1
    kw = dict(alpha=alpha, temperature=temp, divergence=db[0], beta=db[1])
    so, sg = run_sparse(p, k, dtype=torch.float64, chunk_size=7, **kw)
    ro, rg = bucketed_reference(p, k, **kw)
    assert abs(float(so.loss.detach()) - float(ro)) <= 1e-9 * max(1.0, abs(float(ro)))
    for a, b in zip(sg, rg):
        assert float((a - b).norm()) <= 1e-8 * max(1.0, float(b.norm()))


def test_top_k_loss_is_a_lower_bound_close_to_the_full_forward_kl():
    g = torch.Generator().manual_seed(0)
    p = {"h": torch.randn(64, 16, generator=g), "w": torch.randn(97, 16, generator=g),
         "ht": torch.randn(64, 16, generator=g), "wt": torch.randn(97, 16, generator=g) * 2,
         "y": torch.randint(0, 97, (64,), generator=g)}
    kw = dict(alpha=0.0, temperature=2.0, divergence="forward_kl", beta=0.5, chunk_size=16)
    full = float(run_fused(p, **kw)[0].kd)
    kds = [float(run_sparse(p, k, **kw)[0].kd) for k in (4, 16, 64, 97)]
    assert all(a <= b + 1e-6 for a, b in zip(kds, kds[1:]))  # more ids, tighter bound
    assert kds[-1] == pytest.approx(full, rel=1e-5) and kds[0] < full


def test_temperature_differing_from_the_cache_with_a_tail_is_refused():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(8, 4, generator=g), torch.randn(20, 4, generator=g)
    ids, lp, tail = sparse_teacher_targets(torch.randn(8, 20, generator=g), 5, 4.0)
    with pytest.raises(ConfigError, match="kd.temperature: 2 differs from the teacher cache's temperature 4"):
        fused_linear_sparse_kd_loss(h, w, ids, lp, tail, torch.zeros(8, dtype=torch.long), alpha=0.5,
                                    temperature=2.0, cache_temperature=4.0)


@pytest.mark.parametrize("bad, msg", [
    (lambda i: i + 100, "teacher ids must be in 0..19"),
    (lambda i: i[:, :0], "top-k must be in 1..20"),
    (lambda i: i[:4], "expected hidden"),
])
def test_bad_sparse_targets_are_errors(bad, msg):
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(8, 4, generator=g), torch.randn(20, 4, generator=g)
    ids, lp, tail = sparse_teacher_targets(torch.randn(8, 20, generator=g), 5, 1.0)
    bid = bad(ids)
    with pytest.raises(ValueError, match=msg):
        fused_linear_sparse_kd_loss(h, w, bid, lp[: bid.shape[0], : bid.shape[1]], tail[: bid.shape[0]],
                                    torch.zeros(8, dtype=torch.long), alpha=0.5, temperature=1.0,
                                    cache_temperature=1.0)


def test_all_masked_and_padding_rules_match_the_online_loss():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(20, 4, generator=g)
    ids, lp, tail = sparse_teacher_targets(torch.randn(6, 20, generator=g), 4, 1.0, valid_vocab=16)
    y = torch.full((6,), -100)
    out = fused_linear_sparse_kd_loss(h, w, ids, lp, tail, y, alpha=0.5, temperature=1.0, cache_temperature=1.0,
                                      valid_vocab=16)
    out.loss.backward()
    assert float(out.loss) == 0.0 and out.tokens == 0 and float(h.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="padding row"):
        fused_linear_sparse_kd_loss(h, w, ids, lp, tail, torch.full((6,), 17), alpha=0.5, temperature=1.0,
                                    cache_temperature=1.0, valid_vocab=16)
