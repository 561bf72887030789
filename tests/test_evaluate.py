"""Held-out eval: chunked metrics are exact, and no broken student can pass the gates."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kd.config import EvalConfig
from kd.errors import DataError, VocabError
from kd.evaluate import (
    COLLAPSE_ID, FINITE_ID, KL_ID, UNIFORM_ID, collapse_gate, evaluate_model, evaluate_run, finite_gate,
    uniform_gate,
)
from kd.results import EvalReport, ModelEval, VocabAlignment

SEQ = 32


def _blocks(student_dir, seq=SEQ) -> torch.Tensor:
    """The bundled corpus, tokenised with the student tokenizer and packed into (n, seq) blocks."""
    from tokenizers import Tokenizer

    from kd.tiny import CORPUS, EOS

    tok = Tokenizer.from_file(str(student_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids = [i for line in CORPUS.read_text().splitlines() if line.strip() for i in tok.encode(line).ids + [eos]]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


def alignment_of(teacher_dir) -> VocabAlignment:
    info = json.loads((teacher_dir.parent / "tiny.json").read_text())
    return VocabAlignment(
        verdict="teacher-padded", teacher_rows=info["teacher_rows"], student_rows=info["student_rows"],
        teacher_tokenizer_size=info["teacher_tokens"], student_tokenizer_size=info["student_tokens"],
        rows_kept=info["student_rows"], valid_vocab=info["student_tokens"],
    )


@pytest.fixture(scope="module")
def setup(tiny_pair):
    """Teacher, untrained student, and a student trained briefly (CE) on the corpus: a healthy pair."""
    from backends import get_backend

    teacher_dir, student_dir = tiny_pair
    be = get_backend("hf")
    teacher, before = be.load(teacher_dir), be.load(student_dir)
    blocks = _blocks(student_dir)
    heldout, train = blocks[:16], blocks[16:]
    after = copy.deepcopy(before)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(after.parameters(), lr=3e-3)
    after.train()
    for _ in range(25):  # past the early "predict the commonest token everywhere" phase (share ~0.4 here)
        rows = train[torch.randint(0, train.shape[0], (8,))]
        loss = after(input_ids=rows, labels=rows).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after.eval()
    return teacher, before, after, heldout, alignment_of(teacher_dir)


def _verdicts(report: EvalReport) -> dict[str, str]:
    return {g.id: g.verdict for g in report.gates}


def test_healthy_pair_passes_every_gate(setup):
    teacher, before, after, heldout, va = setup
    report = evaluate_run(teacher, before, after, heldout, va, EvalConfig(batch_size=4), chunk_size=64)
    assert _verdicts(report) == {FINITE_ID: "pass", UNIFORM_ID: "pass", COLLAPSE_ID: "pass", KL_ID: "pass"}, \
        report.gates
    assert report.passed
    n = heldout.shape[0] * (SEQ - 1)
    assert report.teacher.tokens == report.student_before.tokens == report.student_after.tokens == n
    assert report.teacher.loss < report.student_after.loss < report.student_before.loss
    assert report.student_after.kl_to_teacher < report.student_before.kl_to_teacher
    assert report.teacher.kl_to_teacher is None and report.teacher.top1_agreement is None
    assert report.vocab_size == va.valid_vocab
    # The teacher row equals evaluating the teacher on its own.
    alone = evaluate_model(teacher, None, heldout, rows_kept=va.rows_kept, valid_vocab=va.valid_vocab, batch_size=5)
    assert alone.loss == pytest.approx(report.teacher.loss, rel=1e-5)


def _reference(model, teacher, blocks, valid_vocab) -> dict:
    """Unchunked: the full (N, V) logits at once, straight from the models' forward."""
    with torch.no_grad():
        lm = F.log_softmax(model(input_ids=blocks[:, :-1]).logits[..., :valid_vocab].float(), -1).flatten(0, 1)
        lt = F.log_softmax(teacher(input_ids=blocks[:, :-1]).logits[..., :valid_vocab].float(), -1).flatten(0, 1)
    y = blocks[:, 1:].reshape(-1)
    loss = F.nll_loss(lm, y).item()
    arg = lm.argmax(-1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "kl_to_teacher": (lt.exp() * (lt - lm)).sum(-1).mean().item(),
        "top1_agreement": (arg == lt.argmax(-1)).float().mean().item(),
        "entropy": -(lm.exp() * lm).sum(-1).mean().item(),
        "top_token_share": torch.bincount(arg).max().item() / y.numel(),
        "tokens": y.numel(),
    }


def test_chunked_metrics_equal_unchunked(setup):
    teacher, _, after, heldout, va = setup
    ref = _reference(after, teacher, heldout[:5], va.valid_vocab)
    for batch_size, chunk in ((2, 7), (5, 10_000)):  # non-divisors, and one chunk for everything
        got = evaluate_model(after, teacher, heldout[:5], rows_kept=va.rows_kept, valid_vocab=va.valid_vocab,
                             batch_size=batch_size, chunk_size=chunk).model_dump()
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (k, batch_size, chunk)


def test_max_batches_limits_tokens(setup):
    teacher, _, after, heldout, va = setup
    m = evaluate_model(after, teacher, heldout, rows_kept=va.rows_kept, valid_vocab=va.valid_vocab,
                       batch_size=3, max_batches=2)
    assert m.tokens == 2 * 3 * (SEQ - 1)


def test_nan_student_fails_finite_and_nothing_passes(setup, tmp_path):
    teacher, before, after, heldout, va = setup
    broken = copy.deepcopy(after)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    report = evaluate_run(teacher, before, broken, heldout[:4], va, EvalConfig(batch_size=4))
    v = _verdicts(report)
    assert v[FINITE_ID] == "fail" and "student_after.loss=nan" in report.gates[0].observed
    assert v[COLLAPSE_ID] == v[UNIFORM_ID] == v[KL_ID] == "fail"  # fail-closed: NaN satisfies no claim
    assert not report.passed
    # NaN survives the JSON round trip (written as "NaN", not null), so the evidence stays valid.
    again = EvalReport.model_validate_json(report.model_dump_json())
    assert math.isnan(again.student_after.loss)
    # ... and the evidence is written, verifies, and says fail.
    from datetime import datetime, timezone

    from kd.config import RunConfig
    from kd.evidence.manifest import load_manifest, write_evidence
    from kd.evidence.verify import verify_run_dir

    cfg = RunConfig.model_validate({"name": "nan", "teacher": {"repo": "tiny:teacher"}, "student": {"repo": "tiny:student"}})
    now = datetime.now(timezone.utc)
    write_evidence(tmp_path / "nan", config=cfg, preflight=None, models={}, vocab=va, training=None,
                   eval_report=report, start=now, end=now)
    assert verify_run_dir(tmp_path / "nan") == []
    m = load_manifest(tmp_path / "nan")
    assert m.run.status == "fail" and math.isnan(m.eval.student_after.loss)
    assert {f.id: f.verdict for f in m.falsifiers}[FINITE_ID] == "fail"
    assert '"NaN"' in (tmp_path / "nan" / "eval.json").read_text()


def test_collapsed_student_fails_collapse_gate(setup):
    teacher, before, after, heldout, va = setup
    flat = copy.deepcopy(after)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()  # every logit equal: a uniform distribution
    report = evaluate_run(teacher, before, flat, heldout[:4], va, EvalConfig(batch_size=4))
    v = _verdicts(report)
    assert v[FINITE_ID] == "pass"
    assert v[COLLAPSE_ID] == "fail"
    gate = next(g for g in report.gates if g.id == COLLAPSE_ID)
    assert gate.observed.startswith("COLLAPSED: ") and "entropy" in gate.observed and "top-token share" in gate.observed
    assert "train.lr" in gate.observed  # says what to try next
    assert report.student_after.perplexity == pytest.approx(va.valid_vocab, rel=1e-4)
    assert report.student_after.top_token_share == 1.0


def test_kl_gate_needs_improvement_and_can_be_turned_off(setup):
    teacher, before, _, heldout, va = setup
    report = evaluate_run(teacher, before, before, heldout[:4], va, EvalConfig(batch_size=4))
    assert _verdicts(report)[KL_ID] == "fail"  # equal KL is no improvement
    off = evaluate_run(teacher, before, before, heldout[:4], va, EvalConfig(batch_size=4, require_kl_improvement=False))
    assert KL_ID not in _verdicts(off)  # not checked -> not claimed (never a fake pass)


def _ev(**kw) -> ModelEval:
    base = dict(loss=2.0, perplexity=7.4, kl_to_teacher=0.5, top1_agreement=0.5, entropy=2.0,
                top_token_share=0.1, tokens=100)
    return ModelEval(**{**base, **kw})


def test_top_token_share_is_judged_against_the_teacher():
    cfg = EvalConfig()
    assert collapse_gate(_ev(top_token_share=0.99), _ev(top_token_share=0.12), 360, cfg).verdict == "fail"
    # The data itself is that repetitive: a teacher at 0.99 makes 0.98 normal.
    assert collapse_gate(_ev(top_token_share=0.98), _ev(top_token_share=0.99), 360, cfg).verdict == "pass"
    assert collapse_gate(_ev(top_token_share=0.999), _ev(top_token_share=0.97), 360, cfg).verdict == "fail"
    assert collapse_gate(_ev(top_token_share=0.5), _ev(), 360, cfg).verdict == "pass"
    assert collapse_gate(_ev(entropy=float("nan")), _ev(), 360, cfg).verdict == "fail"
    # a high perplexity alone is not collapse: that is the uniform gate's claim
    assert collapse_gate(_ev(perplexity=200.0), _ev(), 360, cfg).verdict == "pass"
    assert collapse_gate(_ev(entropy=0.995 * math.log(360)), _ev(), 360, cfg).verdict == "fail"


def test_worse_than_uniform_is_its_own_verdict_not_collapse():
    """Issue 21.3: a pruned student still above a uniform guess (perplexity 109,187 over V=49,152, healthy
    entropy and no dominant token) fails the uniform gate, with a message that says so, and is not collapsed."""
    cfg, v = EvalConfig(), 49_152
    still_learning = _ev(perplexity=109_187.0, loss=math.log(109_187.0), entropy=6.0, top_token_share=0.2)
    u = uniform_gate(still_learning, v, cfg, before=_ev(perplexity=1.7e5))
    assert u.id == UNIFORM_ID and u.verdict == "fail"
    assert u.observed.startswith("WORSE THAN UNIFORM: ") and "Not the same as collapsed" in u.observed
    assert "more steps" in u.observed and "diverged" not in u.observed
    diverged = uniform_gate(_ev(perplexity=float("inf")), v, cfg, before=_ev(perplexity=30.0))
    assert diverged.verdict == "fail" and "diverged" in diverged.observed and "lower train.lr" in diverged.observed
    assert collapse_gate(still_learning, _ev(), v, cfg).verdict == "pass"
    assert uniform_gate(_ev(perplexity=0.49 * v), v, cfg).verdict == "pass"
    assert uniform_gate(_ev(perplexity=0.5 * v), v, cfg).verdict == "fail"  # the limit itself is not below it
    assert uniform_gate(_ev(perplexity=float("nan")), v, cfg).verdict == "fail"


def test_finite_gate_names_the_bad_metric():
    g = finite_gate({"teacher": _ev(), "student_after": _ev(perplexity=float("inf"))})
    assert g.verdict == "fail" and "student_after.perplexity=inf" in g.observed
    assert finite_gate({"teacher": _ev(kl_to_teacher=None)}).verdict == "pass"


def test_bad_inputs_are_named(setup):
    teacher, _, after, heldout, va = setup
    bad = heldout[:2].clone()
    bad[0, 3] = va.valid_vocab  # a padding id in the data
    with pytest.raises(DataError, match=str(va.valid_vocab)):
        evaluate_model(after, teacher, bad, rows_kept=va.rows_kept, valid_vocab=va.valid_vocab, batch_size=2)
    with pytest.raises(VocabError, match="fewer than valid_vocab"):
        evaluate_model(after, None, heldout[:2], rows_kept=10_000, valid_vocab=10_000, batch_size=2)
    with pytest.raises(DataError):
        evaluate_model(after, None, heldout[:0], rows_kept=va.rows_kept, valid_vocab=va.valid_vocab, batch_size=2)
