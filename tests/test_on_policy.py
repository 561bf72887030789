"""On-policy distillation (issue 17): prompts from the loss mask, seeded sampling inside the valid vocab,
completion-only loss, resume equality, the GKD draw, and the offline + on-policy refusal (real CLI)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends import get_backend
from kd.config import load_config
from kd.data import IGNORE, Batch, pack_dataset
from kd.train.objectives import Drawn, batch_kind
from kd.train.on_policy import GenerationSettings, get_generator, prompts_from_batch, stop_ids_of
from kd.train.on_policy.generation import Samples
from kd.train.loop import train_student
from kd.train.objectives import OnlineObjective
from kd.vocab import align_vocab
from tests.test_manifest import inputs  # noqa: F401  (fixture)
from tests.test_train import straight_and_resumed, weights

OP = ["train.steps=4", "train.checkpoint_every=2", "train.batch_size=2", "train.warmup_steps=1",
      "kd.on_policy.fraction=0.5", "kd.on_policy.max_new_tokens=12", "kd.on_policy.prompt_tokens=8",
      "train.device=cpu", "train.dtype=float32"]


@pytest.fixture(scope="module")
def setup(tiny_pair):
    teacher, student = tiny_pair
    cfg = load_config("configs/smoke.yaml", OP)
    packed = pack_dataset(cfg.data, student, max_positions=256, min_train_blocks=4)
    return cfg, teacher, student, align_vocab(teacher, student), packed


def test_chat_prompt_is_the_conversation_before_each_trained_turn():
    # one row, two documents: [sys user | asst asst] [user | asst] + padding; labels mark trained tokens
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]])
    trained = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)  # token t carries the loss
    labels = torch.where(trained[1:], ids[0, 1:], torch.full((9,), IGNORE)).unsqueeze(0)
    seen = {tuple(prompts_from_batch(Batch(ids, labels, pos), fmt="chat", prompt_tokens=4, max_prompt_tokens=99,
                                     rng=random.Random(s))[0]) for s in range(20)}
    assert seen == {(5, 6, 7), (10, 11)}  # everything before each trained turn, never across documents
    cut = prompts_from_batch(Batch(ids, labels, pos), fmt="chat", prompt_tokens=4, max_prompt_tokens=2,
                             rng=random.Random(0))[0]
    assert len(cut) == 2 and cut in ([6, 7], [10, 11])  # left cut keeps the turn header
    text = prompts_from_batch(Batch(ids, labels, pos), fmt="text", prompt_tokens=3, max_prompt_tokens=99,
                              rng=random.Random(0))
    assert text == [[5, 6, 7]]  # text: a prefix of the stated length of a document long enough to continue


def test_sampling_is_seeded_and_stays_inside_the_valid_vocab(tiny_pair):
    teacher, student = tiny_pair
    al = align_vocab(teacher, student)
    model = get_backend("hf").load(student)
    assert model.get_output_embeddings().weight.shape[0] > al.valid_vocab  # padding rows exist: the test can fail
    gen = get_generator("transformers", stop_ids=stop_ids_of(student), pad_id=0, valid_vocab=al.valid_vocab)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 4
    hot = GenerationSettings(temperature=50.0, top_p=1.0, max_new_tokens=40)  # near uniform: padding rows would show
    a = gen.generate(model, prompts, hot, seed=123)
    b = gen.generate(model, prompts, hot, seed=123)
    c = gen.generate(model, prompts, hot, seed=124)
    assert a.completions == b.completions != c.completions
    drawn = [t for comp in a.completions + c.completions for t in comp]
    assert len(drawn) > 300 and max(drawn) < al.valid_vocab
    # without the mask the same draws reach the padding rows
    from kd.train.on_policy import generation as g

    unmasked = get_generator("transformers", stop_ids=stop_ids_of(student), pad_id=0,
                             valid_vocab=model.get_output_embeddings().weight.shape[0])
    d = unmasked.generate(model, prompts, hot, seed=123)
    assert max(t for comp in d.completions for t in comp) >= al.valid_vocab
    assert g.GENERATORS.keys() == {"transformers"}


def test_prompt_and_padding_get_zero_gradient(setup):
    cfg, teacher, student, al, _ = setup
    backend = get_backend("hf")
    s, t = backend.load(student), backend.load(teacher)
    t.requires_grad_(False)
    gcfg = cfg.model_copy(deep=True)
    gcfg.kd.alpha, gcfg.kd.divergence, gcfg.kd.temperature = 0.0, "reverse_kl", 1.0
    obj = OnlineObjective(gcfg, s, t, al, False, "cpu")
    samples = Samples(prompts=[[5, 6, 7, 8], [9, 10]], completions=[[11, 12], [13, 14, 15, 0]], pad_id=0)
    batch = samples.batch()
    assert batch.ids.tolist() == [[5, 6, 7, 8, 11, 12], [9, 10, 13, 14, 15, 0]]
    assert batch.labels.tolist() == [[-100, -100, -100, 11, 12], [-100, 13, 14, 15, 0]]
    grads = {}
    norm = s.get_decoder().norm  # the hidden states the fused loss reads

    def keep_grad(module, inputs, output):
        output.register_hook(lambda g: grads.setdefault("h", g))

    hook = norm.register_forward_hook(keep_grad)
    try:
        out = obj(batch)
        out.loss.backward()
    finally:
        hook.remove()
    g = grads["h"][:, :-1].abs().sum(-1)  # position j predicts token j+1 (label j)
    masked = batch.labels == IGNORE
    assert out.tokens == 6 and bool((g[masked] == 0).all()) and bool((g[~masked] > 0).all())
    # padding after the sequence changes nothing, prompt content only through attention (not as a label)
    padded = Samples(samples.prompts, samples.completions, pad_id=0).batch()
    wide = Batch(torch.cat([padded.ids, torch.full((2, 3), 77)], 1), torch.cat([padded.labels, torch.full((2, 3), IGNORE)], 1),
                 torch.arange(9).expand(2, 9).clone())
    with torch.no_grad():
        assert float(obj(wide).loss) == pytest.approx(float(out.loss.detach()), rel=1e-6)


def test_gkd_draw_is_a_pure_function_and_matches_the_fraction():
    op = load_config("configs/smoke.yaml", ["kd.on_policy.fraction=0.3"]).kd.on_policy
    kinds = [batch_kind(op, 0, step, 0) for step in range(2000)]
    assert kinds == [batch_kind(op, 0, step, 0) for step in range(2000)]
    assert set(kinds) == {"on_policy", "off_policy"} and abs(kinds.count("on_policy") / 2000 - 0.3) < 0.04
    seq = load_config("configs/smoke.yaml", ["kd.on_policy.fraction=0.3", "kd.on_policy.seq_kd=true"]).kd.on_policy
    assert {batch_kind(seq, 0, s, 0) for s in range(200)} == {"on_policy", "seq_kd"}


def test_seq_kd_trains_on_teacher_samples(setup, tmp_path):
    """seq_kd: the batches not drawn on-policy get teacher completions (teacher vocab is wider than the valid
    vocab here: its padding rows are never sampled, or the loss would refuse the label)."""
    cfg, teacher, student, al, packed = setup
    cfg = load_config("configs/smoke.yaml", OP + ["train.steps=2", "kd.on_policy.fraction=0", "kd.on_policy.seq_kd=true"])
    result = train_student(cfg, teacher, student, al, packed, tmp_path / "seqkd")
    assert result.on_policy["batches"] == {"off_policy": 0, "on_policy": 0, "seq_kd": 2}
    assert result.on_policy["generated_tokens"] > 0 and result.final_loss == result.final_loss


def test_resumed_on_policy_run_equals_uninterrupted(setup, tmp_path):
    cfg, teacher, student, al, packed = setup
    straight, resumed, checkpoint = straight_and_resumed(cfg, teacher, student, al, packed, tmp_path)
    assert checkpoint == "step-000002"
    assert resumed.resumed_from_step == 2
    a, b = weights(straight.checkpoint_dir), weights(resumed.checkpoint_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in open(straight.metrics_path)]
    again = [json.loads(x) for x in open(resumed.metrics_path)]
    assert [r["gen_tokens"] for r in rows] == [r["gen_tokens"] for r in again]
    assert sum(r["batches_on_policy"] for r in rows) >= 1 and sum(r["batches_off_policy"] for r in rows) >= 1
    op = straight.on_policy
    assert op["samples"] == 2 * op["batches"]["on_policy"] and op["generated_tokens"] > 0
    assert 0 < op["gen_share"] < 1 and op["gen_tokens_per_s"] > 0 and op["settings"]["fraction"] == 0.5
    assert resumed.on_policy["generated_tokens"] == op["generated_tokens"]


def test_offline_teacher_and_on_policy_exit_2_through_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "configs/smoke.yaml", "--evidence-dir",
                           str(tmp_path), "--set", "kd.teacher_mode=offline", "--set", "kd.on_policy.fraction=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "kd.teacher_mode" in line and "kd.on_policy.fraction" in line
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.slow
def test_two_gloo_ranks_ddp_and_fsdp2_on_policy(setup, tmp_path):
    """Each rank samples its own rows' prompts (seed includes the rank); DDP and FSDP2 (teacher sharded,
    activation checkpointing: generation gathers every layer, ranks step together) draw as many samples per
    step and generated tokens per run and end with the same weights (the sampled ids are not compared)."""
    from kd.train.distributed.launch import run_torchrun

    _, teacher, student, al, packed = setup
    base = OP + ["train.steps=3", "train.checkpoint_every=0", "kd.on_policy.fraction=1", "train.nproc_per_node=2",
                 "train.rank_timeout_s=120"]
    results = {}
    for mode, extra in (("ddp", []), ("fsdp", ["train.teacher_sharding=shard", "train.gradient_checkpointing=true"])):
        cfg = load_config("configs/smoke.yaml", base + [f"train.distributed={mode}"] + extra)
        events: list[dict] = []
        results[mode] = run_torchrun(cfg, teacher, student, al, tmp_path / mode, prepared_dir=packed.root,
                                     on_event=events.append)
        steps = [e for e in events if e["kind"] == "step"]
        assert [e["step"] for e in steps] == [1, 2, 3]
        assert all(e["batches_on_policy"] == 1 and e["samples"] == 4 and e["gen_tokens"] > 0 for e in steps)
        assert all(0 < e["gen_share"] < 1 and torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    ddp, fsdp = results["ddp"], results["fsdp"]
    assert fsdp.device == "cpu x2 (fsdp)" and ddp.on_policy["samples"] == fsdp.on_policy["samples"] == 12
    assert ddp.on_policy["generated_tokens"] == fsdp.on_policy["generated_tokens"]
    a, b = weights(ddp.checkpoint_dir), weights(fsdp.checkpoint_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_eval_on_own_samples_is_recorded_and_verify_recomputes_its_falsifier(tiny_pair, inputs, tmp_path, capsys):  # noqa: F811
    from flows.cli import main
    from kd.data import open_prepared
    from kd.evaluate import ON_SAMPLE_ID, eval_gates
    from kd.evaluate.on_samples import SampleSpec, evaluate_on_samples
    from kd.evidence.manifest import write_evidence
    from kd.evidence.verify import verify_run_dir

    teacher_dir, student_dir = tiny_pair
    cfg = load_config("configs/smoke.yaml", ["eval.on_sample_prompts=4"])
    packed = pack_dataset(cfg.data, student_dir, max_positions=256, min_train_blocks=4)
    al = align_vocab(teacher_dir, student_dir)
    backend = get_backend("hf")
    t, s = backend.load(teacher_dir), backend.load(student_dir)
    stops = stop_ids_of(student_dir)
    spec = SampleSpec(stop_ids=frozenset(stops), pad_id=min(stops), fmt="text", prompts=4, max_new_tokens=10,
                      prompt_tokens=8, seed=3, batch_size=2)
    rep = evaluate_on_samples(t, s, s, open_prepared(packed.root).heldout, al, spec, chunk_size=64)
    assert rep.before.tokens > 0 and rep.before.samples == 4 and rep.before.reverse_kl > 0
    assert rep.before.teacher_nll > 0 and rep.before == rep.after  # same model, same seed: same samples and numbers

    # the gate is fail-closed: no improvement (equal numbers) fails, an improvement passes
    ev_cfg = cfg.eval.model_copy(update={"require_on_sample_improvement": True})
    base = inputs["eval_report"]
    gates = lambda r: eval_gates(base.teacher, base.student_before, base.student_after, 360, ev_cfg, on_samples=r)  # noqa: E731
    assert {g.id: g.verdict for g in gates(rep)}[ON_SAMPLE_ID] == "fail"
    assert {g.id: g.verdict for g in gates(None)}[ON_SAMPLE_ID] == "fail"
    better = rep.model_copy(update={"after": rep.after.model_copy(update={"reverse_kl": rep.before.reverse_kl / 2})})
    assert {g.id: g.verdict for g in gates(better)}[ON_SAMPLE_ID] == "pass"

    config = inputs["config"].model_copy(update={"eval": ev_cfg})
    report = base.model_copy(update={"on_samples": better, "gates": gates(better)})
    run = tmp_path / "evidence" / "op"
    summary = {"settings": config.kd.on_policy.model_dump(mode="json") | {"fraction": 0.5}, "samples": 8,
               "generated_tokens": 96, "stopped_at_eos": 1, "batches": {"off_policy": 6, "on_policy": 4, "seq_kd": 0},
               "gen_tokens_per_s": 120.0, "gen_share": 0.4, "logged_steps": 10}
    training = inputs["training"].model_copy(update={"on_policy": summary})
    m = write_evidence(run, **{**inputs, "config": config, "eval_report": report, "training": training})
    assert m.run.status == "pass" and verify_run_dir(run) == []
    assert json.loads((run / "eval.json").read_text())["on_samples"]["after"]["reverse_kl"] == better.after.reverse_kl
    assert main(["evidence", "show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "on own samples" in out and f"[PASS] {ON_SAMPLE_ID}" in out
    assert "on-policy: fraction 0.5, reverse_kl" in out and "96 tokens generated" in out
    assert json.loads((run / "manifest.json").read_text())["training"]["on_policy"]["samples"] == 8

    # numbers that say "worse" with the verdict left at pass: verify recomputes the falsifier and names it
    for name in ("manifest.json", "eval.json"):
        raw = json.loads((run / name).read_text())
        ev = raw["eval"] if name == "manifest.json" else raw
        ev["on_samples"]["after"]["reverse_kl"] = rep.before.reverse_kl * 2
        (run / name).write_text(json.dumps(raw, indent=2))
    problems = verify_run_dir(run)
    assert any(ON_SAMPLE_ID in p and "the recorded numbers say fail" in p for p in problems), problems


def test_a_drawn_batch_keeps_its_kind_and_rows_are_keyword_only():
    """Batch's rows / split (where a prepared batch came from) are keyword-only: when they were positional, the
    on-policy draw Drawn(ids, labels, pos, kind) put "on_policy" in `rows` and trained every generated batch as
    off-policy (caught by the engine tests: the cache had no such block)."""
    ids = torch.arange(8).view(2, 4)
    d = Drawn(ids, ids[:, 1:], None, "on_policy")
    assert d.kind == "on_policy" and d.rows is None
    with pytest.raises(TypeError):
        Batch(ids, ids[:, 1:], None, [0, 1])
    kept = Drawn(ids, ids[:, 1:], None, rows=[3, 5], split="train", kind="off_policy")
    assert (kept.kind, list(kept.rows), kept.split) == ("off_policy", [3, 5], "train")
