"""Property tests for kd/train/losses.py: the fused chunked KD loss against the plain reference and the math.

Random shapes and values from hypothesis (N <= 64, V <= 97, H <= 16); everything runs in seconds.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.train.losses import DIVERGENCES, KDLossOutput, fused_linear_kd_loss, iter_logit_chunks, kd_loss_reference

FAST = settings(max_examples=25, deadline=None)
DIV_BETA = st.one_of(
    st.tuples(st.sampled_from(["forward_kl", "reverse_kl"]), st.just(0.5)),
    st.tuples(st.just("jsd"), st.floats(0.05, 0.95)),
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@st.composite
def problems(draw, dtype=torch.float32, masked=True, max_scale=4.0):
    """A random KD problem: hidden states, output matrices (teacher maybe wider), labels with some masked."""
    n = draw(st.integers(1, 64))
    v = draw(st.integers(2, 97))
    hs, ht = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    extra = draw(st.integers(0, 5))
    scale = draw(st.floats(0.1, max_scale))  # logit scale: flat to peaky distributions
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = {
        "h": torch.randn(n, hs, generator=g, dtype=dtype),
        "w": torch.randn(v, hs, generator=g, dtype=dtype) * scale / math.sqrt(hs),
        "ht": torch.randn(n, ht, generator=g, dtype=dtype),
        "wt": torch.randn(v + extra, ht, generator=g, dtype=dtype) * scale / math.sqrt(ht),
        "y": torch.randint(0, v, (n,), generator=g),
    }
    if masked:
        p["y"][torch.rand(n, generator=g) < draw(st.floats(0.0, 0.5))] = -100
    if draw(st.booleans()):
        p["b"] = torch.randn(v, generator=g, dtype=dtype)
        p["bt"] = torch.randn(v + extra, generator=g, dtype=dtype)
    return p


def run_fused(p, *, dtype=None, **kw):
    """Fused loss on problem p; returns (output, grads (h, w, b-or-None))."""
    def cast(x):  # always a fresh leaf: never mark the shared problem tensors as requiring grad
        return x.detach().to(dtype or x.dtype, copy=True)

    h, w = cast(p["h"]).requires_grad_(), cast(p["w"]).requires_grad_()
    b = cast(p["b"]).requires_grad_() if "b" in p else None
    bt = cast(p["bt"]) if "bt" in p else None
    out = fused_linear_kd_loss(h, w, cast(p["ht"]), cast(p["wt"]), p["y"], student_bias=b, teacher_bias=bt, **kw)
    out.loss.backward()
    return replace(out, loss=out.loss.detach()), (h.grad, w.grad, None if b is None else b.grad)


def student_logits(p, dtype):
    """Full student logits z = h w^T (+ b) of problem p from fresh leaves; returns (z, leaves (h, w, b-or-None))."""
    h, w = p["h"].to(dtype, copy=True).requires_grad_(), p["w"].to(dtype, copy=True).requires_grad_()
    b = p["b"].to(dtype, copy=True).requires_grad_() if "b" in p else None
    return h @ w.t() + (b if b is not None else 0), (h, w, b)


def grads(leaves) -> tuple:
    return tuple(None if x is None else x.grad for x in leaves)


def run_ref(p, *, dtype=torch.float32, **kw):
    """Reference loss on full logits built from problem p; grads by autograd through the matmul."""
    z, leaves = student_logits(p, dtype)
    t = p["ht"].to(dtype) @ p["wt"].to(dtype).t() + (p["bt"].to(dtype) if "bt" in p else 0)
    out = kd_loss_reference(z, t, p["y"], **kw)
    out.loss.backward()
    return replace(out, loss=out.loss.detach()), grads(leaves)


def close_to_ref(f, r32, r64, rtol: float = 1e-5, atol: float = 0.0) -> bool:
    """||f - r32|| <= rtol ||r32|| + 2 ||r32 - r64|| + atol (norms; plain abs for scalars).

    Relative error alone cannot work near KL = 0: sum p (log p - log q) cancels terms of size ~1, so every
    fp32 implementation (the reference too) has an absolute error of a few 1e-8..1e-7 there. The bound is
    widened by the fp32 reference's own error (its distance to float64) and a floor `atol` of ~10 fp32 ulps
    of the quantity's natural scale (see `floors`); any real mistake is orders of magnitude above both.
    """
    f, r32, r64 = (torch.as_tensor(x).detach().double() for x in (f, r32, r64))
    return float((f - r32).norm()) <= rtol * float(r32.norm()) + 2 * float((r32 - r64).norm()) + atol


def run_ce(p, dtype=torch.float32):
    """Plain cross-entropy on full logits, with grads."""
    z, leaves = student_logits(p, dtype)
    ce = F.cross_entropy(z, p["y"], ignore_index=-100)
    ce.backward()
    return ce.detach(), grads(leaves)


def floors(p, temp: float) -> tuple[float, list[float]]:
    """Absolute floors for close_to_ref: 1e-6 of the natural scale of the loss (1 + T^2) and of each gradient.

    A gradient's scale is (1 + T) times the float64 gradient of the mean log-partition logsumexp(z): the size
    of a softmax-weighted gradient without cancellation. (Cross-entropy's gradient is no such scale: it
    vanishes where the student is confidently right, while the KD term's fp32 rounding does not.)
    """
    mask = p["y"] != -100
    if not bool(mask.any()):
        return 0.0, [0.0, 0.0, 0.0]
    z, leaves = student_logits(p, torch.float64)
    torch.logsumexp(z[mask], dim=-1).mean().backward()
    return 1e-6 * (1 + temp**2), [0.0 if x is None else 1e-6 * (1 + temp) * float(x.norm()) for x in grads(leaves)]


@FAST
@given(p=problems(), db=DIV_BETA, alpha=st.floats(0, 1), temp=st.floats(0.5, 5.0), chunk=st.integers(1, 80))
def test_chunked_equals_unchunked(p, db, alpha, temp, chunk):
    kw = dict(alpha=alpha, temperature=temp, divergence=db[0], beta=db[1])
    fo, fg = run_fused(p, chunk_size=chunk, **kw)
    ro, rg = run_ref(p, **kw)
    r64, rg64 = run_ref(p, dtype=torch.float64, **kw)
    assert fo.tokens == ro.tokens == int((p["y"] != -100).sum())
    fl, fgs = floors(p, temp)
    for name in ("loss", "ce", "kd"):
        a, b, c = (getattr(o, name).detach() for o in (fo, ro, r64))
        assert close_to_ref(a, b, c, atol=fl), (name, float(a), float(b), float(c))
    for a, b, c, fl_g in zip(fg, rg, rg64, fgs):
        if a is not None:
            assert close_to_ref(a, b, c, atol=fl_g), (rel(a, b), rel(b, c))


@FAST
@given(p=problems(), db=DIV_BETA, alpha=st.floats(0, 1), temp=st.floats(0.5, 5.0), chunk=st.integers(1, 80))
def test_gradients_match_float64_autograd(p, db, alpha, temp, chunk):
    kw = dict(alpha=alpha, temperature=temp, divergence=db[0], beta=db[1])
    ro, rg = run_ref(p, dtype=torch.float64, **kw)
    # The hand-derived gradient formulas, run in float64, equal autograd's to float64 precision...
    fo64, fg64 = run_fused(p, dtype=torch.float64, chunk_size=chunk, **kw)
    assert abs(float(fo64.loss) - float(ro.loss)) <= 1e-10 * max(abs(float(ro.loss)), 1.0)
    # ...and the fp32 run is within rel 1e-5 (+ the fp32 floor, see close_to_ref) of the float64 truth.
    fo32, fg32 = run_fused(p, chunk_size=chunk, **kw)
    fl, fgs = floors(p, temp)
    assert close_to_ref(fo32.loss, ro.loss, ro.loss, atol=fl)
    for a32, a64, r, fl_g in zip(fg32, fg64, rg, fgs):
        assert (a32 is None) == (r is None)
        if r is not None:
            assert close_to_ref(a64, r, r, rtol=1e-9, atol=1e-8 * fl_g), rel(a64, r)
            assert close_to_ref(a32, r, r, atol=fl_g), rel(a32, r)


@FAST
@given(p=problems(), div=st.sampled_from(DIVERGENCES), temp=st.floats(0.5, 5.0))
def test_alpha_one_is_pure_cross_entropy(p, div, temp):
    fo, fg = run_fused(p, alpha=1.0, temperature=temp, divergence=div, chunk_size=16)
    if fo.tokens == 0:
        return
    ce32, g32 = run_ce(p)
    ce64, g64 = run_ce(p, torch.float64)
    fl, fgs = floors(p, 1.0)
    assert close_to_ref(fo.loss, ce32, ce64, atol=fl) and close_to_ref(fo.ce, ce32, ce64, atol=fl)
    for a, b, c, fl_g in zip(fg, g32, g64, fgs):
        assert a is None or close_to_ref(a, b, c, atol=fl_g), (rel(a, b), rel(b, c))


@FAST
@given(p=problems(), db=DIV_BETA, temp=st.floats(0.5, 5.0))
def test_identical_teacher_and_student_give_zero_divergence_and_gradient(p, db, temp):
    same = dict(p, ht=p["h"], wt=p["w"])
    if "b" in p:
        same["bt"] = p["b"]
    fo, fg = run_fused(same, alpha=0.0, temperature=temp, divergence=db[0], beta=db[1], chunk_size=7)
    assert abs(float(fo.kd)) <= 1e-6
    assert abs(float(fo.loss)) <= 1e-6 * temp**2
    for g in fg:
        if g is not None:
            assert float(g.abs().max()) <= 1e-6
    ro, _ = run_ref(same, alpha=0.0, temperature=temp, divergence=db[0], beta=db[1])
    assert abs(float(ro.kd)) <= 1e-6


@FAST
@given(p=problems(), db=DIV_BETA, temp=st.floats(0.25, 8.0), alpha=st.floats(0, 1))
def test_temperature_squared_scaling(p, db, temp, alpha):
    kw = dict(temperature=temp, divergence=db[0], beta=db[1])
    f0, _ = run_fused(p, alpha=0.0, **kw)
    r0, _ = run_ref(p, alpha=0.0, **kw)
    for o in (f0, r0):
        assert abs(float(o.loss) - temp**2 * float(o.kd)) <= 1e-5 * max(float(o.loss), 1e-6)
    # kd is reported before the weights: it does not depend on alpha.
    fa, _ = run_fused(p, alpha=alpha, **kw)
    assert abs(float(fa.kd) - float(f0.kd)) <= 1e-6 * max(float(f0.kd), 1.0)
    assert abs(float(fa.loss) - (alpha * float(fa.ce) + (1 - alpha) * temp**2 * float(fa.kd))) <= 1e-5 * max(
        float(fa.loss), 1e-3
    )


@settings(max_examples=20, deadline=None)
@given(p=problems(masked=False), div=st.sampled_from(DIVERGENCES))
def test_all_masked_gives_zero_loss_and_zero_grads(p, div):
    p = dict(p, y=torch.full_like(p["y"], -100))
    for run in (run_fused, run_ref):
        out, grads = run(p, alpha=0.3, temperature=2.0, divergence=div)
        assert out.tokens == 0
        assert float(out.loss) == 0.0 and float(out.ce) == 0.0 and float(out.kd) == 0.0
        for g in grads:
            assert g is None or (torch.isfinite(g).all() and float(g.abs().max()) == 0.0)


@FAST
@given(p=problems(), db=DIV_BETA, pad=st.integers(1, 9), chunk=st.integers(1, 40))
def test_padding_rows_with_minus_inf_change_nothing(p, db, pad, chunk):
    """Rows >= valid_vocab carrying -inf logits (bias -inf) + valid_vocab == a model without those rows."""
    v, g = p["w"].shape[0], torch.Generator().manual_seed(1)
    kw = dict(alpha=0.4, temperature=2.0, divergence=db[0], beta=db[1], chunk_size=chunk)
    b = p.get("b", torch.zeros(v))
    bt = p.get("bt", torch.zeros(p["wt"].shape[0]))
    padded = dict(
        p,
        w=torch.cat([p["w"], torch.randn(pad, p["w"].shape[1], generator=g)]),
        wt=torch.cat([p["wt"][:v], torch.randn(pad, p["wt"].shape[1], generator=g)]),
        b=torch.cat([b, torch.full((pad,), -math.inf)]),
        bt=torch.cat([bt[:v], torch.full((pad,), -math.inf)]),
    )
    plain = dict(p, b=b, bt=bt)
    po, pg = run_fused(padded, valid_vocab=v, **kw)
    qo, qg = run_fused(plain, **kw)
    rkw = {k: x for k, x in kw.items() if k != "chunk_size"}
    ro, rg = run_ref(padded, valid_vocab=v, **rkw)
    r64, rg64 = run_ref(plain, dtype=torch.float64, **rkw)
    assert torch.isfinite(po.loss) and torch.isfinite(ro.loss)
    fl, fgs = floors(plain, kw["temperature"])
    assert close_to_ref(po.loss, qo.loss, r64.loss, atol=fl)  # fused: padded == unpadded
    assert close_to_ref(ro.loss, qo.loss, r64.loss, atol=fl)  # reference with -inf columns: the same
    assert close_to_ref(pg[0], qg[0], rg64[0], atol=fgs[0])  # grad wrt hidden
    for a, b, c, fl_g in zip(pg[1:], qg[1:], rg64[1:], fgs[1:]):  # weight and bias: the first v rows
        assert close_to_ref(a[:v], b, c, atol=fl_g), (rel(a[:v], b), rel(b, c))
    assert close_to_ref(rg[1][:v], qg[1], rg64[1], atol=fgs[1])
    assert float(pg[1][v:].abs().max()) == 0.0 and float(pg[2][v:].abs().max()) == 0.0  # padding rows get no grad


def test_label_in_padding_range_is_an_error():
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    y = torch.tensor([1, 2, 8, -100])
    with pytest.raises(ValueError, match="label 8 at position 2 is a padding row"):
        fused_linear_kd_loss(h, w, h, w, y, alpha=0.5, temperature=1.0, valid_vocab=8)
    with pytest.raises(ValueError, match="padding row"):
        kd_loss_reference(h @ w.t(), h @ w.t(), y, alpha=0.5, temperature=1.0, valid_vocab=8)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(divergence="kl"), "divergence"),
        (dict(beta=-0.1, divergence="jsd"), "beta"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(valid_vocab=11), "valid_vocab"),
    ],
)
def test_bad_arguments_are_errors(kw, msg):
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    args = dict(alpha=0.5, temperature=1.0) | kw
    with pytest.raises(ValueError, match=msg):
        fused_linear_kd_loss(h, w, h, w, torch.tensor([1, 2, 3, 4]), **args)


def test_teacher_with_fewer_rows_is_an_error():
    h = torch.randn(4, 3)
    with pytest.raises(ValueError, match="teacher has 9 vocab rows"):
        fused_linear_kd_loss(h, torch.randn(10, 3), h, torch.randn(9, 3), torch.tensor([1, 2, 3, 4]), alpha=0.5, temperature=1.0)


@FAST
@given(p=problems(), db=DIV_BETA, extra=st.integers(1, 20))
def test_teacher_rows_beyond_student_vocab_are_cut(p, db, extra):
    v = p["w"].shape[0]
    g = torch.Generator().manual_seed(2)
    wide = dict(p, wt=torch.cat([p["wt"], 10 * torch.randn(extra, p["wt"].shape[1], generator=g)]))
    cut = dict(p, wt=p["wt"][:v])
    if "bt" in p:
        wide["bt"] = torch.cat([p["bt"], 10 * torch.randn(extra, generator=g)])
        cut["bt"] = p["bt"][:v]
    kw = dict(alpha=0.3, temperature=3.0, divergence=db[0], beta=db[1])
    wo, wg = run_fused(wide, **kw)
    co, cg = run_fused(cut, **kw)
    assert float(wo.loss) == float(co.loss)
    assert all(a is None or torch.equal(a, b) for a, b in zip(wg, cg))
    ro, _ = run_ref(wide, **kw)
    assert abs(float(ro.loss) - float(co.loss)) <= 1e-5 * max(float(co.loss), 1e-3)


@FAST
@given(p=problems(), db=DIV_BETA)
def test_chunk_size_does_not_matter(p, db):
    """Chunks of 1, not dividing N, equal to N and larger than N give the same loss and grads."""
    n = p["h"].shape[0]
    kw = dict(alpha=0.3, temperature=2.0, divergence=db[0], beta=db[1])
    base_o, base_g = run_fused(p, chunk_size=n + 7, **kw)
    r64, rg64 = run_ref(p, dtype=torch.float64, **kw)
    fl, fgs = floors(p, kw["temperature"])
    for c in {1, max(1, n // 3 + 1), n}:
        o, g = run_fused(p, chunk_size=c, **kw)
        assert close_to_ref(o.loss, base_o.loss, r64.loss, rtol=1e-6, atol=fl)
        for a, b, c64, fl_g in zip(g, base_g, rg64, fgs):
            assert a is None or close_to_ref(a, b, c64, rtol=1e-6, atol=fl_g), (rel(a, b), rel(b, c64))


@settings(max_examples=25, deadline=None)
@given(p=problems(dtype=torch.float64, max_scale=1.0))
def test_jsd_beta_limits_are_the_two_kls(p):
    # Moderate logits and T=3: the limits below converge like eps * max(p/q), which must be small to check.
    kw = dict(alpha=0.0, temperature=3.0)
    fwd, _ = run_ref(p, dtype=torch.float64, divergence="forward_kl", **kw)
    rev, _ = run_ref(p, dtype=torch.float64, divergence="reverse_kl", **kw)
    if fwd.tokens == 0:
        return
    # By definition (TRL / Liger convention) at the endpoints, in both implementations...
    for run in (run_ref, run_fused):
        j0, _ = run(p, dtype=torch.float64, divergence="jsd", beta=0.0, **kw)
        j1, _ = run(p, dtype=torch.float64, divergence="jsd", beta=1.0, **kw)
        assert abs(float(j0.kd) - float(fwd.kd)) <= 1e-9 * max(float(fwd.kd), 1e-9)
        assert abs(float(j1.kd) - float(rev.kd)) <= 1e-9 * max(float(rev.kd), 1e-9)
    # ...and as the limits of the interior formula: JSD_b / b -> KL(p||q), JSD_b / (1 - b) -> KL(q||p).
    eps = 1e-9  # small enough that eps * p/q << 1, large enough for float64 to resolve JSD_eps
    near0, _ = run_fused(p, dtype=torch.float64, divergence="jsd", beta=eps, **kw)
    near1, _ = run_fused(p, dtype=torch.float64, divergence="jsd", beta=1 - eps, **kw)
    # (+1e-6: float64 rounding of JSD_eps, ~1e-16 per log-prob term, divided by eps)
    assert abs(float(near0.kd) / eps - float(fwd.kd)) <= 1e-3 * float(fwd.kd) + 1e-6
    assert abs(float(near1.kd) / eps - float(rev.kd)) <= 1e-3 * float(rev.kd) + 1e-6


@settings(max_examples=20, deadline=None)
@given(p=problems(), db=DIV_BETA)
def test_bf16_inputs_run_and_are_close_to_fp32(p, db):
    kw = dict(alpha=0.3, temperature=2.0, divergence=db[0], beta=db[1], chunk_size=9)
    bo, bg = run_fused(p, dtype=torch.bfloat16, **kw)
    fo, fg = run_fused(p, **kw)
    assert bg[0].dtype == bg[1].dtype == torch.bfloat16
    assert bo.loss.dtype == torch.float32 and torch.isfinite(bo.loss)
    if fo.tokens:
        assert abs(float(bo.loss) - float(fo.loss)) <= 3e-2 * max(float(fo.loss), 0.1)
        assert rel(bg[1], fg[1]) <= 0.1 and rel(bg[0], fg[0]) <= 0.1


def test_bf16_hidden_with_fp32_weights_works():
    """Autocast gives bf16 hidden states while the head stays fp32: the matmul runs in the weight's dtype."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (20,), generator=g)
    hb = h.bfloat16().requires_grad_()
    out = fused_linear_kd_loss(hb, w, h.bfloat16(), w, y, alpha=0.5, temperature=2.0)
    out.loss.backward()
    ref = kd_loss_reference(hb.detach().float() @ w.t(), h.bfloat16().float() @ w.t(), y, alpha=0.5, temperature=2.0)
    assert hb.grad.dtype == torch.bfloat16
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) <= 1e-5 * float(ref.loss.detach())


@settings(max_examples=15, deadline=None)
@given(p=problems(), scale=st.floats(-3.0, 3.0).filter(lambda s: abs(s) > 1e-3))
def test_incoming_gradient_scales_the_result(p, scale):
    kw = dict(alpha=0.3, temperature=2.0, chunk_size=8)
    _, g1 = run_fused(p, **kw)
    h, w = p["h"].clone().requires_grad_(), p["w"].clone().requires_grad_()
    out = fused_linear_kd_loss(h, w, p["ht"], p["wt"], p["y"], student_bias=p.get("b"), teacher_bias=p.get("bt"), **kw)
    (scale * out.loss).backward()
    if out.tokens:
        assert rel(h.grad, scale * g1[0]) <= 1e-6 and rel(w.grad, scale * g1[1]) <= 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tied_embedding_model_gets_the_reference_gradients(divergence):
    """Qwen2-style student whose lm_head IS the input embedding: fused loss on hidden states gives every
    parameter (the shared matrix included: embedding + head contributions) the same grad as full logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 61, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).reshape(-1)
    teacher_h, teacher_w = torch.randn(24, 20), torch.randn(61 + 3, 20)
    kw = dict(alpha=0.3, temperature=2.0, divergence=divergence, valid_vocab=58)
    labels[labels >= 58] = -100

    def grads(fused: bool):
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(-1, 16)
        if fused:
            out = fused_linear_kd_loss(hidden, model.lm_head.weight, teacher_h, teacher_w, labels, chunk_size=5, **kw)
        else:
            out = kd_loss_reference(model.lm_head(hidden), teacher_h @ teacher_w.t(), labels, **kw)
        out.loss.backward()
        return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    lf, gf = grads(True)
    lr, gr = grads(False)
    assert abs(lf - lr) <= 1e-5 * lr
    assert gf.keys() == gr.keys() and "model.embed_tokens.weight" in gf
    for name in gf:
        assert rel(gf[name], gr[name]) <= 1e-5, name


@settings(max_examples=15, deadline=None)
@given(p=problems(), chunk=st.integers(1, 70), cut=st.integers(0, 5))
def test_iter_logit_chunks_covers_all_rows(p, chunk, cut):
    v = p["w"].shape[0]
    ve = max(1, v - cut)
    full = (p["h"] @ p["w"].t() + p.get("b", 0))[:, :ve]
    seen = 0
    for start, logits in iter_logit_chunks(p["h"], p["w"], p.get("b"), chunk_size=chunk, valid_vocab=ve):
        assert start == seen and logits.dtype == torch.float32 and not logits.requires_grad
        assert torch.allclose(logits, full[start : start + len(logits)], rtol=1e-5, atol=1e-5)
        seen += len(logits)
    assert seen == p["h"].shape[0]


def test_no_grad_mode_gives_the_value_without_a_graph():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(12, 5, generator=g, requires_grad=True), torch.randn(20, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 20, (12,), generator=g)
    with torch.no_grad():
        ev = fused_linear_kd_loss(h, w, h, 2 * w, y, alpha=0.3, temperature=2.0)
    tr = fused_linear_kd_loss(h, w, h, 2 * w, y, alpha=0.3, temperature=2.0)
    assert not ev.loss.requires_grad and tr.loss.requires_grad
    assert float(ev.loss) == float(tr.loss.detach())


def test_output_type():
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    out = fused_linear_kd_loss(h, w, h, w, torch.tensor([1, 2, 3, 4]), alpha=0.5, temperature=1.0)
    assert isinstance(out, KDLossOutput) and out.tokens == 4
    assert out.loss.ndim == 0 and not out.ce.requires_grad and not out.kd.requires_grad


@pytest.mark.slow
def test_benchmark_script_runs_at_toy_size(tmp_path):
    """bench/kd_loss.py end to end (parent + one fresh child per variant) at a toy shape: rows, ratios, JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "kd.json"
    cmd = [sys.executable, str(root / "bench" / "kd_loss.py"), "--ns", "8", "24", "--hidden", "16", "--vocab", "300",
           "--variants", "naive", "kdflow", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["variant"], r["n"]): r for r in report["rows"]}
    assert set(rows) == {(v, n) for v in ("naive", "kdflow") for n in (8, 24)}
    for n in (8, 24):
        assert all(rows[v, n]["status"] == "ok" and rows[v, n]["time_s"] > 0 for v in ("naive", "kdflow"))
        assert abs(rows["naive", n]["loss"] - rows["kdflow", n]["loss"]) <= 1e-4 * rows["naive", n]["loss"]
    assert "kdflow_over_naive_memory" in report["ratios"]["24"]
