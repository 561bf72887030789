"""The end of an assistant turn distilled across chat templates (kd/cross_tokenizer/losses.py's end-of-turn term,
kd/cross_tokenizer/chat.py's turn ends): on real tokenizer pairs (SmolLM2's as the teacher's, Qwen2's and GPT-2's as
the student's) the plan finds one turn end per assistant turn, at the positions predicting each side's end-of-turn
token; the term is 0 for a model against itself, > 0 when the student's end-of-turn logit moves, its gradient is the
binary KL's, it reaches that logit, and `end_of_turn: false` gives the loss without it exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.cross_tokenizer.blocks import plan_batch
from kd.cross_tokenizer.group_eval import group_binary_kl
from kd.cross_tokenizer.losses import Side, cross_tokenizer_kd_loss
from kd.cross_tokenizer.report import special_ids
from kd.cross_tokenizer.settings import CrossTokenizerLoss
from kd.data import IGNORE
from tests.test_cross_tokenizer_chat import aligned, conversations


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_one_turn_end_per_assistant_turn_at_the_end_of_turn_tokens(name):
    """Every assistant turn of the first 40 genesis-chat conversations (and the edge cases) has exactly one turn end
    in the plan; on the teacher's side its event ends with `<|im_end|>`, predicted from the position after the
    content; on Qwen2's it is Qwen2's own `<|im_end|>` (another id), on GPT-2's (the template read as text) the
    first markup token, `<` or `.<`."""
    n_turns = n_ends = 0
    for msgs in conversations():
        pair, ids, seg = aligned(name, msgs)
        t_end = pair.teacher.convert_tokens_to_ids("<|im_end|>")
        row = np.asarray(ids)[None]
        plan = plan_batch(pair, row, None, row[:, 1:], special_ids(pair.student), IGNORE, segments=[[seg]])
        turns = sum(m["role"] == "assistant" and bool(m["content"].strip()) for m in msgs)
        assert len(seg.end_of_turn) == len(plan.eot_s) == len(plan.eot_t) == turns
        n_turns, n_ends = n_turns + turns, n_ends + len(plan.eot_s)
        for (a, b), (c, d) in zip(plan.eot_s.tolist(), plan.eot_t.tolist()):
            assert plan.t_ids[d - 1] == t_end  # before it, the content bytes a straddling student token carries
            assert pair.teacher.decode(plan.t_ids[c:d - 1]) == ("." if name == "gpt2" and b - a == 1 and
                                                                  pair.student.convert_ids_to_tokens(
                                                                      int(plan.s_ids[a])) == ".<" else "")
            last = int(plan.s_ids[b - 1])
            assert int(row[0, plan.s_rows[b - 1] + 1]) == last  # the row that predicts the event's token
            if name == "qwen2":
                assert b - a == 1 and d - c == 1 and last == pair.student.convert_tokens_to_ids("<|im_end|>") != t_end
            else:
                assert pair.student.convert_ids_to_tokens(last) in {"<", ".<"}
        # the event's student tokens are outside every content group: no double count with the groups
        content_tokens = {j for g in np.flatnonzero(plan.keep) for j in range(plan.sb[g], plan.sb[g + 1])}
        assert not content_tokens & {j for a, b in plan.eot_s.tolist() for j in range(a, b)}
    assert n_turns >= 40 and n_ends == n_turns


def test_untrained_turn_ends_are_left_out():
    """With the labels masked (a prompt), no turn end counts."""
    msgs = conversations(1)[0]
    pair, ids, seg = aligned("qwen2", msgs)
    row = np.asarray(ids)[None]
    plan = plan_batch(pair, row, None, np.full((1, row.shape[1] - 1), IGNORE), special_ids(pair.student), IGNORE,
                      segments=[[seg]])
    assert len(seg.end_of_turn) > 0 and len(plan.eot_s) == 0


V, H, N, EOT = 12, 8, 10, 11


def _sides(shift: float = 0.0):
    """Student and teacher on the same ids, one token per group; the teacher is the student itself, except that
    the student's end-of-turn logit (row EOT of its output matrix) is moved by `shift`. Token 7 is the end of a
    turn (group 7 is markup: not in the group mask)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V - 1, (N,), generator=g)
    ids[7] = EOT
    bounds = torch.arange(N + 1)
    ws = w.clone()
    ws[EOT] += shift * h[7] / h[7].norm() ** 2  # the logit of EOT at the row predicting token 7 (Side: hidden[j] predicts ids[j]): + shift
    student = Side(h.clone().requires_grad_(True), ws.requires_grad_(True), ids, bounds)
    teacher = Side(h, w, ids, bounds)
    mask = torch.ones(N, dtype=torch.bool)
    mask[7] = False
    return student, teacher, mask


def _loss(shift: float, end_of_turn: bool, *, alpha: float = 0.0, ranges=True, normalizer=20.0):
    s, t, mask = _sides(shift)
    cfg = CrossTokenizerLoss(kind="uld", end_of_turn=end_of_turn, chunk_size=3, token_chunk_size=4)
    eot = (torch.tensor([[7, 8]]), torch.tensor([[7, 8]])) if ranges else None
    out = cross_tokenizer_kd_loss(s, t, cfg, alpha=alpha, temperature=2.0, group_mask=mask, normalizer=normalizer,
                                  end_of_turn=eot)
    out.loss.backward()
    return out, s


def test_zero_for_the_same_model_positive_when_the_end_logit_moves():
    on, _ = _loss(0.0, True)
    off, _ = _loss(0.0, False)
    assert abs(float(on.loss.detach()) - float(off.loss.detach())) < 1e-12 and on.tokens == off.tokens + 1
    for shift in (-2.0, 1.5):
        on, _ = _loss(shift, True)
        off, _ = _loss(shift, False)
        s, t, _ = _sides(shift)
        lp = lambda side: F.log_softmax(side.hidden[7] @ side.weight.t() / 2.0, -1)[EOT]  # noqa: E731
        want = 2.0**2 * float(group_binary_kl(lp(t)[None], lp(s)[None].detach())[0]) / 20.0
        assert want > 1e-4
        assert abs((float(on.loss.detach()) - float(off.loss.detach())) - want) < 1e-10


def test_gradient_reaches_the_end_of_turn_logit_and_is_the_binary_kls():
    for shift in (0.0, 1.5):
        on, s_on = _loss(shift, True)
        off, s_off = _loss(shift, False)
        g_w = s_on.weight.grad - s_off.weight.grad  # the end-of-turn term's own gradient
        g_h = s_on.hidden.grad - s_off.hidden.grad
        s, t, _ = _sides(shift)
        lt = F.log_softmax(t.hidden[7] @ t.weight.t() / 2.0, -1)[EOT].detach()
        ref = 2.0**2 * group_binary_kl(lt[None], F.log_softmax(s.hidden[7] @ s.weight.t() / 2.0, -1)[EOT][None]) / 20.0
        ref.sum().backward()
        torch.testing.assert_close(g_w, s.weight.grad, atol=1e-12, rtol=1e-8)
        torch.testing.assert_close(g_h, s.hidden.grad, atol=1e-12, rtol=1e-8)
        if shift:
            assert float(g_w[EOT].abs().sum()) > 1e-6  # it moves the end-of-turn logit
            assert float(g_w[EOT] @ s.hidden[7].detach()) > 0  # the student says "end" too often: pushed down


def test_switch_off_is_the_loss_without_turn_ends_exactly():
    for alpha, normalizer in ((0.3, 20.0), (0.3, None), (0.0, None)):
        off, s_off = _loss(1.5, False, alpha=alpha, normalizer=normalizer)
        none, s_none = _loss(1.5, True, alpha=alpha, ranges=False, normalizer=normalizer)
        assert torch.equal(off.loss, none.loss) and torch.equal(off.kd, none.kd) and torch.equal(off.ce, none.ce)
        assert torch.equal(s_off.weight.grad, s_none.weight.grad) and torch.equal(s_off.hidden.grad, s_none.hidden.grad)
        on, _ = _loss(1.5, True, alpha=alpha, normalizer=normalizer)
        assert float(on.loss.detach()) != float(off.loss.detach())
    on, _ = _loss(0.0, True, alpha=0.3)  # alpha > 0: the CE covers the student's end-of-turn token
    off, _ = _loss(0.0, False, alpha=0.3)
    s, _, _ = _sides(0.0)
    ce_eot = -float(F.log_softmax(s.hidden[7].detach() @ s.weight.detach().t(), -1)[EOT]) / 20.0
    assert abs((float(on.ce) - float(off.ce)) - ce_eot) < 1e-12
