"""Eval across tokenizers (kd/evaluate/cross_tokenizer.py): bits per byte on the same bytes for teacher, before and
after; identity equals the same-vocabulary eval; group KL and agreement (kd/cross_tokenizer/group_eval.py) are 0 and 1
for a model against itself, not for a perturbed one; the KL gate is stated on bits per byte and on groups, never a
silent pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoTokenizer

from backends import get_backend
from kd.config import EvalConfig
from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.transplant import transplant_tokenizer
from kd.cross_tokenizer.vocab_files import load_tokenizer
from kd.evaluate.cross_tokenizer import evaluate_cross
from kd.cross_tokenizer.group_eval import group_binary_kl, group_outcomes
from kd.evaluate.gates import BPB_ID, GROUP_KL_ID, KL_ID, eval_gates
from kd.evaluate.heldout import evaluate_models
from kd.evaluate.step import evaluate_run
from kd.evidence.verdicts import recompute_falsifiers
from kd.results import ModelEval
from kd.vocab import align_vocab

TEXT = ("The cat sat on the mat and looked at the door. Numbers like 12345 and 2026; emoji 😀 and 日本語. "
        "A second sentence follows the first one, and a third one after it.")


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    be = get_backend("hf")
    return be.load(tiny_pair[0]), be.load(tiny_pair[1])


def test_identity_equals_same_vocabulary_eval(tiny_pair, tiny):
    teacher, student = tiny
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    ascii_text = TEXT.encode("ascii", "ignore").decode() * 2  # no character cut by a block edge: same tokens scored
    ids = tok(ascii_text, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[:96]).view(3, 32)
    va = align_vocab(*tiny_pair)
    same = evaluate_models([teacher, student], teacher, blocks, compare=[False, True], rows_kept=va.rows_kept,
                           valid_vocab=va.valid_vocab, batch_size=2, chunk_size=16, device="cpu", max_batches=None,
                           backend="hf")
    cross = evaluate_cross([teacher, student], teacher, blocks, TokenizerPair.of(tok, tok), batch_size=2, chunk_size=16)
    table = TokenizerPair.of(tok, tok).student_bytes
    n_bytes = sum(len(table.pieces[i]) for i in blocks[:, 1:].reshape(-1).tolist())
    for a, b in zip(same, cross):
        assert a.tokens == b.tokens
        assert abs(a.loss - b.loss) < 1e-5 and abs(a.entropy - b.entropy) < 1e-4
        assert b.kl_to_teacher is None and b.top1_agreement is None  # not applicable, not a fake 0 / 1
        assert abs(b.bits_per_byte - a.loss * a.tokens / math.log(2) / n_bytes) < 1e-6
    assert cross[0].group_kl_to_teacher is None and cross[0].groups is None  # the teacher's row: nothing to compare
    assert cross[1].groups > 0 and cross[1].group_kl_to_teacher > 0 and cross[1].group_top1_agreement < 1


def _ascii_blocks(tok, n=96, width=32):
    ids = tok(TEXT.encode("ascii", "ignore").decode() * 2, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n]).view(-1, width)


def test_group_metrics_identity_and_perturbed(tiny_pair, tiny):
    """A copy of the teacher against the teacher: group KL 0, agreement 1 (same tokenizer, so every group is one
    token); noise on its output head: group KL > 0. The identity is exact up to batched-vs-packed float noise."""
    teacher, _ = tiny
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    same, noisy = copy.deepcopy(teacher), copy.deepcopy(teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        w, _ = get_backend("hf").output_head(noisy)
        w.add_(0.5 * torch.randn_like(w))
    rows = evaluate_cross([same, noisy], teacher, _ascii_blocks(tok), TokenizerPair.of(tok, tok), batch_size=2,
                          chunk_size=16)
    assert rows[0].groups == rows[1].groups > 50
    assert abs(rows[0].group_kl_to_teacher) < 1e-6 and rows[0].group_top1_agreement == 1.0
    assert rows[1].group_kl_to_teacher > 1e-3 and rows[1].group_top1_agreement < 1.0


def test_group_outcomes_chain_rule_and_binary_kl():
    lp = torch.log(torch.tensor([0.5, 0.8, 0.9, 0.25]))
    hit = torch.tensor([True, False, True, False])
    lp_g, top = group_outcomes(lp, hit, torch.tensor([0, 1, 3, 4]))  # groups {0}, {1, 2}, {3}
    assert torch.allclose(lp_g.exp(), torch.tensor([0.5, 0.72, 0.25], dtype=torch.float64))
    assert top.tolist() == [True, False, False]  # the group's first token decides its top choice
    pt, ps = torch.tensor([0.5, 0.72, 0.25], dtype=torch.float64), torch.tensor([0.25, 0.72, 0.5], dtype=torch.float64)
    want = pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
    assert torch.allclose(group_binary_kl(pt.log(), ps.log()), want)
    assert group_binary_kl(pt.log(), pt.log()).abs().max() == 0
    sure = group_binary_kl(torch.zeros(1), torch.tensor([math.log(0.5)]))  # p_t rounds to 1: finite, ~ log 2
    assert math.isfinite(float(sure)) and abs(float(sure) - math.log(2)) < 1e-6


@pytest.fixture(scope="module")
def gpt2_student(tiny_pair, tiny):
    model = get_backend("hf").load(tiny_pair[1])
    transplant_tokenizer(model, AutoTokenizer.from_pretrained(tiny_pair[1]), load_tokenizer("gpt2"))
    return model


def test_cross_pair_bits_per_byte_and_gates(tiny_pair, tiny, gpt2_student, tmp_path):
    teacher, _ = tiny
    pair = TokenizerPair.of(AutoTokenizer.from_pretrained(tiny_pair[0]), load_tokenizer("gpt2"))
    ids = pair.student(TEXT * 2, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[:80]).view(2, 40)
    t_row, s_row = evaluate_cross([teacher, gpt2_student], teacher, blocks, pair, batch_size=1, chunk_size=8)
    for row in (t_row, s_row):
        assert math.isfinite(row.bits_per_byte) and row.bits_per_byte > 0 and row.tokens > 0
        assert row.kl_to_teacher is None and row.top1_agreement is None
    assert s_row.groups > 0 and s_row.group_kl_to_teacher > 0 and 0 <= s_row.group_top1_agreement <= 1
    assert t_row.tokens > s_row.tokens  # the 376-token teacher needs more tokens for the same bytes
    # the whole eval with the cross verdict: the KL gate is stated on bits per byte
    student_dir = tmp_path / "s"
    gpt2_student.save_pretrained(student_dir)
    load_tokenizer("gpt2").save_pretrained(student_dir)
    va = align_vocab(tiny_pair[0], student_dir, cross_tokenizer=True)
    cfg = EvalConfig(batch_size=1)
    report = evaluate_run(teacher, gpt2_student, gpt2_student, blocks, va, cfg, chunk_size=8, pair=pair)
    ids_ = [g.id for g in report.gates]
    assert report.cross_tokenizer and BPB_ID in ids_ and GROUP_KL_ID in ids_ and KL_ID not in ids_
    bpb = next(g for g in report.gates if g.id == BPB_ID)
    assert bpb.verdict == "fail" and "not applicable" in bpb.claim  # before == after: no improvement, no pass
    assert next(g for g in report.gates if g.id == GROUP_KL_ID).verdict == "fail"
    again = recompute_falsifiers(None, None, report, max_dropped_mass=1e-3, eval_cfg=cfg)
    assert [g.model_dump() for g in again] == [g.model_dump() for g in report.gates]


def _row(bpb, group_kl=None):
    return ModelEval(loss=1.0, perplexity=math.e, kl_to_teacher=None, top1_agreement=None, entropy=1.0,
                     top_token_share=0.1, tokens=10, bits_per_byte=bpb, group_kl_to_teacher=group_kl,
                     group_top1_agreement=None if group_kl is None else 0.5, groups=None if group_kl is None else 7)


@pytest.mark.parametrize("before,after,verdict", [(2.0, 1.5, "pass"), (1.5, 1.5, "fail"), (1.5, float("nan"), "fail"),
                                                  (1.5, None, "fail")])
def test_bpb_gate_is_fail_closed(before, after, verdict):
    gates = eval_gates(_row(1.0), _row(before), _row(after), 1000, EvalConfig(), cross_tokenizer=True)
    assert next(g for g in gates if g.id == BPB_ID).verdict == verdict


@pytest.mark.parametrize("before,after,verdict", [(0.3, 0.2, "pass"), (0.2, 0.2, "fail"), (0.2, 0.3, "fail"),
                                                  (0.2, float("nan"), "fail"), (None, None, "fail")])
def test_group_kl_gate_is_fail_closed(before, after, verdict):
    gates = eval_gates(_row(1.0), _row(2.0, before), _row(1.5, after), 1000, EvalConfig(), cross_tokenizer=True)
    assert next(g for g in gates if g.id == BPB_ID).verdict == "pass"  # kept beside the group gate
    assert next(g for g in gates if g.id == GROUP_KL_ID).verdict == verdict
