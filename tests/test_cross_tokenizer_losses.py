"""Issue 30: the chain-rule merge and the cross-tokenizer losses (ULD, exact-match hybrid, projection KL) on
real tokenizer pairs: chain rule, identity, ULD invariants, a re-indexed teacher vocabulary, and the chunked
losses against a dense float64 reference (values and gradients)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.cross_tokenizer.align import TokenizerPair, align_text
from kd.cross_tokenizer.losses import (
    CrossTokenizerLoss, Side, cross_tokenizer_kd_loss, generalized_divergence, uld_distance,
)
from kd.cross_tokenizer.merge import group_text_logprob, later_token_sums, realized_logprobs
from kd.cross_tokenizer.vocab_files import TEACHER
from tests.cross_tokenizer_pairs import STUDENTS, all_pairs
from kd.cross_tokenizer.vocab_map import build_projection, exact_matches, matched_mass
from kd.train.losses import kd_loss_reference

TEXT = ("<|im_start|>user\nWhat is 12345678 + 90? 😀 中文字符  \t\n\n<|im_end|>\n<|im_start|>assistant\n"
        "It is 12345768. café 👩‍👩‍👧 日本語<|im_end|>\n")
H = 8
f64 = torch.float64


SHORT = "<|im_start|>Hi 12345 😀 中文 café<|im_end|>\n"  # multi-token groups on every pair, few groups


@pytest.fixture(scope="module")
def pairs() -> dict[str, TokenizerPair]:
    return all_pairs()


@pytest.fixture(scope="module")
def projections(pairs) -> dict:
    cache: dict = {}
    return lambda name: cache.setdefault(name, build_projection(pairs[name]))


def _side(ids, bounds, vocab: int, seed: int, grad: bool = False) -> Side:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(ids), H, generator=g, dtype=f64).requires_grad_(grad)
    weight = (torch.randn(vocab, H, generator=g, dtype=f64) * 2.0).requires_grad_(grad)
    return Side(hidden, weight, torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(bounds, dtype=torch.long))


def _sides(pair: TokenizerPair, text: str, grad: bool = True) -> tuple[Side, Side]:
    doc = align_text(pair, text)
    return (_side(doc.student.ids, doc.student_bounds, len(pair.student_bytes), 1, grad),
            _side(doc.teacher.ids, doc.teacher_bounds, len(pair.teacher_bytes), 2))


# ------------------------------------------------------------------------------------------- chain rule


def check_chain_rule(pair: TokenizerPair, text: str) -> tuple[Side, Side]:
    s, t = _sides(pair, text, grad=False)
    for side in (s, t):
        dense = F.log_softmax(side.hidden @ side.weight.T, -1)
        lp, _ = realized_logprobs(side.hidden, side.weight, side.ids, chunk_size=5)
        torch.testing.assert_close(lp, dense.gather(1, side.ids[:, None]).squeeze(1), rtol=0, atol=1e-10)
        b = side.bounds
        merged = dense[b[:-1]] + later_token_sums(lp, b)[:, None]  # first position's distribution x later tokens
        realized = merged.gather(1, side.ids[b[:-1]][:, None]).squeeze(1)
        by_hand = torch.stack([dense[j, side.ids[j]] for j in range(len(side.ids))])
        want = torch.stack([by_hand[b[g]:b[g + 1]].sum() for g in range(len(b) - 1)])
        torch.testing.assert_close(realized, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(group_text_logprob(lp, b), want, rtol=0, atol=1e-10)
    return s, t


@pytest.mark.parametrize("student", STUDENTS)
def test_chain_rule_merge(pairs, student):
    """A group's merged probability of its realized text = exp(sum of that side's token log-probs in it), on
    both sides; the chunked realized log-probs equal the dense ones."""
    s, t = check_chain_rule(pairs[student], TEXT)
    assert (s.bounds.diff() > 1).any() or (t.bounds.diff() > 1).any(), "the text must have multi-token groups"


@pytest.mark.parametrize("student", STUDENTS)
@settings(max_examples=5)
@given(text=st.lists(st.sampled_from(["😀", "👩‍👩‍👧", "中文字符", "  ", "\t\n", "1234567", " café", "<|im_start|>",
                                      "<|im_end|>\n", "Hello", " world"]), min_size=1, max_size=8).map("".join))
def test_chain_rule_merge_property(pairs, student, text):
    check_chain_rule(pairs[student], text)


# ------------------------------------------------------------------------------------------- dense reference


def _dense_reference(s: Side, t: Side, kind: str, temperature: float, alpha: float, *, vmap=None, proj=None,
                     top_k: int = 64, divergence="forward_kl", beta=0.5) -> torch.Tensor:
    """Every group's merged distributions from full (N, V) logits, the loss written out plainly."""
    def logits(side):
        return side.hidden @ side.weight.T + (0.0 if side.bias is None else side.bias)

    ls_all = F.log_softmax(logits(s) / temperature, -1)
    lt_all = F.log_softmax(logits(t) / temperature, -1)
    ce = -F.log_softmax(logits(s), -1).gather(1, s.ids[:, None]).sum()
    ds = []
    for g in range(len(s.bounds) - 1):
        rows = []
        for side, lp in ((s, ls_all), (t, lt_all)):
            a, b = int(side.bounds[g]), int(side.bounds[g + 1])
            later = sum((lp[j, side.ids[j]] for j in range(a + 1, b)), torch.zeros((), dtype=f64))
            rows.append(lp[a] + later)
        ls, lt = rows
        if kind == "uld":
            ds.append((torch.sort(lt.exp(), descending=True).values[: len(ls)] - torch.sort(ls.exp(), descending=True).values[: len(lt)]).abs().sum()
                      + torch.sort(lt.exp(), descending=True).values[len(ls):].sum() + torch.sort(ls.exp(), descending=True).values[len(lt):].sum())
        elif kind == "hybrid":
            tm, sm = torch.as_tensor(vmap.teacher_ids), torch.as_tensor(vmap.student_ids)
            d = generalized_divergence(lt[tm], ls[sm], divergence, beta)
            t_rest = torch.ones(len(lt), dtype=torch.bool)
            s_rest = torch.ones(len(ls), dtype=torch.bool)
            t_rest[tm], s_rest[sm] = False, False
            w = vmap.share
            ds.append(w * d + (1 - w) * uld_distance(lt[t_rest].exp(), ls[s_rest].exp()) if w < 1 else d)
        else:
            q = torch.sparse.mm(proj.matrix_t(f64), ls.exp()[:, None]).squeeze(1)  # (Vt, Vs) @ (Vs,)
            top = lt.topk(min(top_k, len(lt))).indices
            rest = torch.ones(len(lt), dtype=torch.bool)
            rest[top] = False
            p_b = torch.cat([lt[top].exp(), lt[rest].exp().sum()[None]])
            q_b = torch.cat([q[top], (q.sum() - q[top].sum()).clamp_min(0)[None]]).clamp_min(1e-30)
            ds.append((torch.where(p_b > 0, p_b * (p_b.log() - q_b.log()), torch.zeros_like(p_b)) - p_b + q_b).sum())
    d = torch.stack(ds).sum() / len(ds)
    return alpha * ce / len(s.ids) + (1 - alpha) * temperature**2 * d


@pytest.mark.parametrize("student,kind", [("gpt2", "uld"), ("phi3", "uld"), ("gpt2", "hybrid"), ("phi3", "hybrid"),
                                          ("phi3", "projection")])
def test_chunked_loss_equals_dense_reference(pairs, projections, student, kind):
    """Values and gradients of the chunked loss (chunks of 3 groups, 5 tokens) = the dense float64 one."""
    pair = pairs[student]
    s, t = _sides(pair, SHORT)
    assert (s.bounds.diff() > 1).any() or (t.bounds.diff() > 1).any()
    vmap = exact_matches(pair.teacher_bytes, pair.student_bytes)
    proj = projections(student) if kind == "projection" else None
    cfg = CrossTokenizerLoss(kind=kind, top_k=16, chunk_size=3, token_chunk_size=5)
    out = cross_tokenizer_kd_loss(s, t, cfg, alpha=0.3, temperature=2.0, vocab_map=vmap, projection=proj)
    out.loss.backward()
    g_h, g_w = s.hidden.grad.clone(), s.weight.grad.clone()
    s.hidden.grad = s.weight.grad = None
    ref = _dense_reference(s, t, kind, 2.0, 0.3, vmap=vmap, proj=proj, top_k=16)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g_h, s.hidden.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_w, s.weight.grad, rtol=1e-7, atol=1e-9)
    assert out.tokens == len(s.bounds) - 1 and torch.isfinite(out.kd)


@pytest.mark.parametrize("student", STUDENTS)
def test_vocab_map_shares_and_matched_mass(pairs, student):
    """Exact matches pair equal bytes one-to-one; the teacher's mass on matched ids is in [0, 1] and 1 for a
    distribution on matched ids only."""
    pair = pairs[student]
    vmap = exact_matches(pair.teacher_bytes, pair.student_bytes)
    assert len(set(vmap.teacher_ids.tolist())) == len(vmap.teacher_ids) == len(set(vmap.student_ids.tolist()))
    for t, s in zip(vmap.teacher_ids[::997].tolist(), vmap.student_ids[::997].tolist()):
        assert pair.teacher_bytes.pieces[t] == pair.student_bytes.pieces[s]
    stats = vmap.as_dict()
    assert 0.3 < stats["teacher_share"] < 1.0 and stats["matched"] == len(vmap.teacher_ids)
    lt = torch.log_softmax(torch.randn(4, len(pair.teacher_bytes), dtype=f64), -1)
    mass = matched_mass(lt, vmap)
    assert ((mass > 0) & (mass < 1)).all()
    only = torch.full_like(lt[:1], float("-inf"))
    only[0, vmap.teacher_ids[:3]] = math.log(1 / 3)
    torch.testing.assert_close(matched_mass(only, vmap), torch.ones(1, dtype=f64))


def test_output_bias_gets_its_gradient(pairs):
    """An output bias (some heads have one) on both sides: value and dL/dbias = the dense float64 reference."""
    pair = pairs["phi3"]
    s0, t0 = _sides(pair, SHORT)
    g = torch.Generator().manual_seed(5)
    bias_s = torch.randn(s0.weight.shape[0], generator=g, dtype=f64).requires_grad_(True)
    s = Side(s0.hidden, s0.weight, s0.ids, s0.bounds, bias_s)
    t = Side(t0.hidden, t0.weight, t0.ids, t0.bounds, torch.randn(t0.weight.shape[0], generator=g, dtype=f64))
    out = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="uld", chunk_size=4, token_chunk_size=7),
                                  alpha=0.3, temperature=2.0)
    (gb,) = torch.autograd.grad(out.loss, [bias_s])
    ref = _dense_reference(s, t, "uld", 2.0, 0.3)
    (rb,) = torch.autograd.grad(ref, [bias_s])
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gb, rb, rtol=1e-7, atol=1e-10)


def test_all_masked_groups_give_zero(pairs):
    s, t = _sides(pairs["qwen2"], "abc def")
    mask = torch.zeros(len(s.bounds) - 1, dtype=torch.bool)
    out = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="uld"), alpha=0.5, temperature=1.0, group_mask=mask)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.tokens == 0 and not s.hidden.grad.any()


# ------------------------------------------------------------------------------------------- identity


def test_identity_same_tokenizer_equals_same_vocabulary_loss(pairs, projections):
    """Same tokenizer both sides: singleton groups, merged = raw (no later tokens), and hybrid / projection
    (k = V) equal kd.train.losses' plain same-vocabulary loss to 1e-6, ULD the per-token sorted L1."""
    pair = pairs[TEACHER]
    s, t = _sides(pair, SHORT)
    n = len(s.ids)
    assert s.bounds.tolist() == t.bounds.tolist() == list(range(n + 1))
    assert not later_token_sums(realized_logprobs(s.hidden, s.weight, s.ids)[0], s.bounds).any()
    vmap = exact_matches(pair.teacher_bytes, pair.student_bytes)
    assert vmap.share == 1.0 and (vmap.teacher_ids == vmap.student_ids).all()
    v = len(pair.teacher_bytes)
    proj = projections(TEACHER)
    zs, zt = s.hidden @ s.weight.T, t.hidden @ t.weight.T
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        want = kd_loss_reference(zs, zt, s.ids, alpha=0.3, temperature=2.0, divergence=divergence).loss
        got = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="hybrid", divergence=divergence), alpha=0.3,
                                      temperature=2.0, vocab_map=vmap).loss
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    want = kd_loss_reference(zs, zt, s.ids, alpha=0.3, temperature=2.0).loss
    got = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="projection", top_k=v), alpha=0.3,
                                  temperature=2.0, projection=proj).loss
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="uld"), alpha=0.0, temperature=2.0).loss
    per_token = uld_distance(F.softmax(zt / 2.0, -1), F.softmax(zs / 2.0, -1)).mean() * 4.0
    torch.testing.assert_close(got, per_token, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- ULD invariants

dists = st.integers(1, 40).flatmap(lambda n: st.lists(st.floats(0, 1), min_size=n, max_size=n))


def _normalized(x: list[float]) -> torch.Tensor:
    t = torch.tensor(x, dtype=f64) + 1e-3
    return t / t.sum()


@settings(max_examples=80)
@given(p=dists, q=dists, seed=st.integers(0, 2**16), pad=st.integers(0, 7), mass=st.floats(0.05, 1.0))
def test_uld_invariants(p, q, seed, pad, mass):
    """Zero under a permutation and under zero-padding, symmetric, at most 2 (at most the two masses' sum for
    merged measures), zero only for equal sorted values."""
    p, q = _normalized(p), _normalized(q)
    perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(seed))
    assert uld_distance(p, p[perm]).item() == pytest.approx(0.0, abs=1e-12)
    assert uld_distance(p, torch.cat([p[perm], torch.zeros(pad, dtype=f64)])).item() == pytest.approx(0.0, abs=1e-12)
    assert uld_distance(p, q).item() == pytest.approx(uld_distance(q, p).item(), abs=1e-12)
    assert 0.0 <= uld_distance(p, q).item() <= 2.0 + 1e-12
    assert uld_distance(p * mass, q).item() <= mass + 1.0 + 1e-12
    batch = torch.stack([p, p.flip(0)])
    assert uld_distance(batch, p[None].expand(2, -1)).abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------------- re-indexed vocabulary


def _permuted_tokenizer(tok, perm: list[int]):
    """The same tokenizer with token i renumbered perm[i] (vocabulary, added tokens; merges are by string)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    j = json.loads(tok.backend_tokenizer.to_str())
    j["model"]["vocab"] = {k: perm[v] for k, v in j["model"]["vocab"].items()}
    for a in j["added_tokens"]:
        a["id"] = perm[a["id"]]
    j["post_processor"] = None
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(j)))


def _tiny_llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(f64).eval()


def _hidden(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Row j predicts ids[j]: the model reads [start] + ids and keeps the outputs before each token."""
    x = torch.cat([torch.tensor([start]), ids])[None]
    return model.model(input_ids=x).last_hidden_state[0, :-1]


def test_reindexed_teacher_vocabulary_equals_plain_kl(pairs):
    """Permute the teacher's ids, its embedding and output rows and its tokenizer: the alignment is one-to-one,
    and the projection (k = V) and hybrid (forward KL) losses equal the plain same-vocabulary KL."""
    base = pairs[TEACHER].teacher
    v = len(base)
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(7))
    permuted = _permuted_tokenizer(base, perm.tolist())
    pair = TokenizerPair.of(permuted, base)  # teacher: permuted; student: the original
    doc = align_text(pair, TEXT)
    assert doc.teacher.ids.tolist() == perm[torch.as_tensor(doc.student.ids)].tolist()
    teacher0, student = _tiny_llama(v, 3), _tiny_llama(v, 4)
    teacher = _tiny_llama(v, 3)
    inv = torch.argsort(perm)
    with torch.no_grad():  # row perm[i] of the permuted teacher is row i of teacher0
        teacher.model.embed_tokens.weight.copy_(teacher0.model.embed_tokens.weight[inv])
        teacher.lm_head.weight.copy_(teacher0.lm_head.weight[inv])
    eos = base.convert_tokens_to_ids("<|endoftext|>")
    s_ids, t_ids = torch.as_tensor(doc.student.ids), torch.as_tensor(doc.teacher.ids)
    with torch.no_grad():
        ht = _hidden(teacher, t_ids, int(perm[eos]))
        ht0 = _hidden(teacher0, s_ids, eos)
    torch.testing.assert_close(ht, ht0, rtol=0, atol=1e-10)  # the permuted teacher is the same function
    hs = _hidden(student, s_ids, eos)
    s = Side(hs, student.lm_head.weight, s_ids, torch.as_tensor(doc.student_bounds).long())
    t = Side(ht, teacher.lm_head.weight, t_ids, torch.as_tensor(doc.teacher_bounds).long())
    plain = kd_loss_reference(hs @ student.lm_head.weight.T, ht0 @ teacher0.lm_head.weight.T, s_ids,
                              alpha=0.3, temperature=2.0).loss
    vmap = exact_matches(pair.teacher_bytes, pair.student_bytes)
    assert vmap.share == 1.0 and (perm[torch.as_tensor(vmap.student_ids)] == torch.as_tensor(vmap.teacher_ids)).all()
    hybrid = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="hybrid"), alpha=0.3, temperature=2.0,
                                     vocab_map=vmap).loss
    proj = cross_tokenizer_kd_loss(s, t, CrossTokenizerLoss(kind="projection", top_k=v), alpha=0.3,
                                   temperature=2.0, projection=build_projection(pair)).loss
    torch.testing.assert_close(hybrid, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(proj, plain, rtol=0, atol=1e-6)


def test_mismatched_vocabulary_sizes_are_named(pairs, projections):
    """A projection or vocab map built for other vocabularies than the output matrices is refused by name
    (e.g. a model's padding rows left in: cut them to the tokenizer's size)."""
    s, t = _sides(pairs["phi3"], "abc", grad=False)
    padded = Side(s.hidden, torch.cat([s.weight, s.weight[:64]]), s.ids, s.bounds)
    with pytest.raises(ValueError, match="cut padding rows"):
        cross_tokenizer_kd_loss(padded, t, CrossTokenizerLoss(kind="projection"), alpha=0.5, temperature=1.0,
                                projection=projections("phi3"))
    small = Side(s.hidden, s.weight[:1000], s.ids.clamp_max(999), s.bounds)
    with pytest.raises(ValueError, match="vocab_map is for"):
        cross_tokenizer_kd_loss(small, t, CrossTokenizerLoss(kind="hybrid"), alpha=0.5, temperature=1.0,
                                vocab_map=exact_matches(pairs["phi3"].teacher_bytes, pairs["phi3"].student_bytes))


def test_config_rejects_unknown_fields_and_kinds():
    with pytest.raises(ValueError):
        CrossTokenizerLoss(kind="wasserstein")
    with pytest.raises(ValueError):
        CrossTokenizerLoss(top_k=0)
    with pytest.raises(ValueError):
        CrossTokenizerLoss(temperature=2.0)
