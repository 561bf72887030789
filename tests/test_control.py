"""The fine-tuning control (issue 27.2): the same student trained with alpha = 1 on the same data, steps, lr and
seed; KD − control per document with a paired bootstrap interval; F-DISTILL-VALUE-001 recomputed by verify."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backends import get_backend
from kd.config import load_config
from kd.data import open_prepared, pack_dataset
from kd.evaluate.control import VALUE_ID, control_config, paired, score_documents, value_gate
from kd.evaluate.heldout import evaluate_model
from kd.results import ControlReport, DocumentScores, ModelEval
from kd.train.loop import train_student
from kd.vocab import align_vocab


def test_every_kd_setting_shares_one_control():
    """alpha, T, divergence and on-policy settings do not change what fine-tuning trains: one cached control."""
    a = control_config(load_config("configs/smoke.yaml", ["kd.alpha=0.2", "kd.temperature=1"]))
    b = control_config(load_config("configs/smoke.yaml", ["kd.alpha=0.7", "kd.divergence=reverse_kl",
                                                          "kd.on_policy.fraction=0.5"]))
    assert a.kd == b.kd and a.kd.alpha == 1.0 and not a.kd.on_policy.enabled
    assert (a.train, a.data, a.student) == (b.train, b.data, b.student)
    c = control_config(load_config("configs/smoke.yaml", ["train.lr=5e-4"]))
    assert c.train != a.train  # the same lr as its KD run: a sweep over lr gets a control per lr


def test_fine_tuning_never_loads_the_teacher_and_equals_alpha_one_with_it(tiny_pair, tmp_path):
    """alpha = 1 trains on the labels alone: without the teacher (a folder that does not exist) the weights
    are exactly those of alpha = 1 with the teacher loaded, whose KD term weighs 0."""
    teacher, student = tiny_pair
    cfg = load_config("configs/smoke.yaml", ["kd.alpha=1", "train.steps=3", "train.batch_size=2",
                                             "train.warmup_steps=1", "train.checkpoint_every=0"])
    packed = pack_dataset(cfg.data, student, max_positions=256, min_train_blocks=2)
    al = align_vocab(teacher, student)
    alone = train_student(cfg, tmp_path / "no-teacher-here", student, al, packed, tmp_path / "alone")
    assert "not loaded: alpha = 1" in (tmp_path / "alone" / "train.log").read_text()
    import kd.train.loop as kt

    real = kt.fine_tuning_only
    kt.fine_tuning_only = lambda c: False  # the teacher loaded and run, as before the control existed
    try:
        with_teacher = train_student(cfg, teacher, student, al, packed, tmp_path / "with")
    finally:
        kt.fine_tuning_only = real
    wa, wb = (load_file(f"{r.checkpoint_dir}/model.safetensors") for r in (alone, with_teacher))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _scores(kd, ctl, tokens=None, nbytes=None) -> DocumentScores:
    n = len(kd)
    return DocumentScores(source="reference", tokens=tokens or [10] * n, bytes=nbytes or [40] * n, nll=[kd, ctl])


def _report(scores: DocumentScores) -> ControlReport:
    ev = ModelEval(loss=1, perplexity=2.7, kl_to_teacher=0.5, top1_agreement=0.5, entropy=1, top_token_share=0.1, tokens=10)
    return ControlReport(control=ev, scores=[scores], differences={}, value_source=scores.source,
                         bootstrap_samples=500, confidence=0.95, bootstrap_seed=0)


def test_paired_interval_and_the_value_gate():
    rng = np.random.default_rng(1)
    hard = rng.uniform(10, 40, 60)  # documents differ a lot; the pairing cancels it
    better = _scores((hard - 1.0).tolist(), hard.tolist())
    bpb = next(d for d in paired(better, samples=500, confidence=0.95, seed=0) if d.metric == "bits_per_byte")
    assert bpb.difference == pytest.approx(-1.0 / 40 / np.log(2)) and bpb.high < 0 and bpb.documents == 60
    assert value_gate(_report(better)).verdict == "pass"
    worse = _scores((hard + 1.0).tolist(), hard.tolist())
    f = value_gate(_report(worse))
    assert f.verdict == "fail" and "fine-tuning beat distillation" in f.observed
    noise = _scores((hard + rng.normal(0, 2, 60)).tolist(), hard.tolist())
    g = value_gate(_report(noise))
    assert g.verdict == "fail" and "no difference this sample can tell" in g.observed
    # seeded: the same interval every time (verify recomputes it)
    assert paired(noise, samples=300, confidence=0.9, seed=5) == paired(noise, samples=300, confidence=0.9, seed=5)
    assert value_gate(None).verdict == "fail"
    nan = _scores([float("nan")] * 3, [1.0] * 3)
    assert value_gate(_report(nan)).verdict == "fail"


def test_document_sums_add_up_to_the_heldout_table(tiny_pair):
    """Per-document sums of the packed held-out split give exactly the eval table's loss and token count."""
    teacher_dir, student_dir = tiny_pair
    cfg = load_config("configs/smoke.yaml")
    packed = pack_dataset(cfg.data, student_dir, max_positions=256, min_train_blocks=4)
    heldout = open_prepared(packed.root).heldout if hasattr(packed, "root") else packed.heldout
    be = get_backend("hf")
    student, teacher = be.load(student_dir), be.load(teacher_dir)
    al = align_vocab(teacher_dir, student_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    docs = score_documents([student, student], heldout, tok, valid_vocab=al.valid_vocab, batch_size=3, chunk_size=64)
    table = evaluate_model(student, None, heldout, rows_kept=al.rows_kept, valid_vocab=al.valid_vocab, batch_size=4,
                           chunk_size=64)
    assert sum(docs.tokens) == table.tokens and len(docs.tokens) > heldout.shape[0]  # several documents per block
    assert sum(docs.nll[0]) / sum(docs.tokens) == pytest.approx(table.loss, rel=1e-6)
    assert docs.nll[0] == docs.nll[1] and min(docs.bytes) > 0
    same = paired(docs, samples=200, confidence=0.95, seed=0)
    assert all(d.difference == 0 and d.low == 0 == d.high for d in same)


@pytest.mark.slow
def test_a_sweep_reuses_the_control_and_verify_recomputes_the_value_claim(prefect_server, tiny_pair, tmp_path):
    """Two runs that differ only in KD settings share one control (the second's train_control is a cache hit
    produced by the first); a manifest whose control numbers are edited to favour KD fails verify."""
    from flows.distill import distill
    from kd.evidence.verify import verify_run_dir

    from tests.conftest import smoke_overrides

    base = smoke_overrides(tmp_path, steps=4) + ["eval.control=true", "eval.max_batches=2",
                                                  "eval.sample_max_new_tokens=4", "eval.heldout_sample_prompts=1"]
    manifests = []
    for alpha in ("0.2", "0.6"):
        state = distill(load_config("configs/smoke.yaml", base + [f"kd.alpha={alpha}"]), return_state=True)
        run_dir = next(p for p in (tmp_path / "evidence").iterdir()
                       if p.name not in {m["run"]["name"] for m in manifests})
        manifests.append(json.loads((run_dir / "manifest.json").read_text()))
        assert state.is_completed() or manifests[-1]["run"]["status"] == "fail"  # VALUE may honestly fail
    first, second = manifests
    assert first["lineage"]["train_control"]["cached"] is False
    assert second["lineage"]["train_control"]["cached"] is True
    assert second["lineage"]["train_control"]["produced_by_run"] == first["run"]["name"]
    assert second["lineage"]["train_student"]["cached"] is False
    assert any(f["id"] == VALUE_ID for f in second["falsifiers"])
    # out-of-domain retention on the default reference text, and the ship check that reads it
    ref = second["eval"]["reference"]
    assert ref["documents"] > 0 and ref["retention"] == ref["teacher_bits_per_byte"] / ref["student_bits_per_byte"]
    assert "F-SHIP-REFERENCE-001" in {c["id"] for c in second["eval"]["ship"]["checks"]}
    assert second["eval"]["control"]["control_checkpoint_sha256"] == first["eval"]["control"]["control_checkpoint_sha256"]

    run_dir = tmp_path / "evidence" / second["run"]["name"]
    assert verify_run_dir(run_dir) == []
    raw = json.loads((run_dir / "manifest.json").read_text())
    recorded = next(f for f in raw["falsifiers"] if f["id"] == VALUE_ID)["verdict"]
    for s in raw["eval"]["control"]["scores"]:  # forge: KD scores far better (or far worse) than recorded
        s["nll"][0] = [x * (0.1 if recorded == "fail" else 10) for x in s["nll"][0]]
    (run_dir / "manifest.json").write_text(json.dumps(raw))
    (run_dir / "eval.json").write_text(json.dumps(raw["eval"]))
    assert any(p.startswith(f"{VALUE_ID}: manifest says {recorded}") for p in verify_run_dir(run_dir))
