"""The cross-tokenizer objective (kd/train/cross_objective.py): identity equals the same-vocabulary objective,
a real cross pair (tiny teacher -> tiny student transplanted to GPT-2's tokenizer) trains with finite loss,
through the objective directly and through the training loop. Wiring tests: none needs the loss to fall."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from backends import get_backend
from kd.config import load_config
from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.transplant import transplant_tokenizer
from kd.cross_tokenizer.vocab_files import load_tokenizer
from kd.data import Batch
from kd.errors import ConfigError
from kd.train.cross_objective import CrossTokenizerObjective
from kd.train.loss_normalization import trained_tokens
from kd.train.objectives import OnlineObjective, make_objective
from kd.vocab import align_vocab

SENTENCES = ["The cat sat on the mat and looked at the door for a long while before it slept.",
             "Numbers like 12345 and 2026 are split in digits; emoji 😀 and 日本語 are bytes."]


def _cfg(*extra):
    return load_config("configs/smoke.yaml", ["kd.cross_tokenizer.enabled=true", "kd.temperature=2.0",
                                              "kd.alpha=0.3", *extra])


@pytest.fixture(scope="module")
def models(tiny_pair):
    be = get_backend("hf")
    teacher = be.load(tiny_pair[0]).eval().requires_grad_(False)
    student = be.load(tiny_pair[1])
    return teacher, student


def _identity_batch(tok) -> Batch:
    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    n = min(len(r) for r in rows)
    ids = torch.tensor([r[:n] for r in rows])
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100  # a masked prompt: neither objective trains it
    return Batch(ids, labels, None)


@pytest.mark.parametrize("kind", ["projection", "hybrid"])
def test_identity_equals_same_vocabulary_objective(tiny_pair, models, kind):
    teacher, student = models
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    batch = _identity_batch(tok)
    cfg = _cfg(f"kd.cross_tokenizer.kind={kind}", "kd.cross_tokenizer.top_k=100000", "kd.cross_tokenizer.chunk_size=7",
               "kd.cross_tokenizer.token_chunk_size=11")
    same = OnlineObjective(cfg, student, teacher, align_vocab(*tiny_pair), False, "cpu")
    cross = CrossTokenizerObjective(cfg, student, teacher, TokenizerPair.of(tok, tok), autocast=False, device="cpu")
    plan = cross.plan(batch)
    assert plan.s_ids.tolist() == plan.t_ids.tolist()  # precondition: the teacher side re-tokenizes to the same ids
    for normalizer in (None, float(trained_tokens(batch))):
        student.zero_grad()
        a = same(batch, normalizer=normalizer)
        a.loss.backward()
        g_same = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        b = cross(batch, normalizer=normalizer)
        b.loss.backward()
        la, lb = float(a.loss.detach()), float(b.loss.detach())
        assert abs(la - lb) < 1e-5, (kind, normalizer, la, lb)
        assert abs(float(a.ce) - float(b.ce)) < 1e-5 and abs(float(a.kd) - float(b.kd)) < 1e-5
        assert b.tokens == a.tokens == trained_tokens(batch)  # one group per trained token
        for x, p in zip(g_same, student.parameters()):
            torch.testing.assert_close(p.grad, x, atol=1e-5, rtol=1e-4)
    student.zero_grad()


@pytest.fixture(scope="module")
def gpt2_student(tiny_pair, tmp_path_factory):
    """The tiny student transplanted onto GPT-2's tokenizer, saved as a model folder."""
    out = tmp_path_factory.mktemp("tiny-gpt2")
    model = get_backend("hf").load(tiny_pair[1])
    report = transplant_tokenizer(model, AutoTokenizer.from_pretrained(tiny_pair[1]), load_tokenizer("gpt2"))
    assert report.new_vocab == 50257
    model.save_pretrained(out)
    load_tokenizer("gpt2").save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["uld", "hybrid", "projection"])
def test_cross_pair_trains_a_few_steps_with_finite_loss(tiny_pair, gpt2_student, kind):
    be = get_backend("hf")
    teacher = be.load(tiny_pair[0]).eval().requires_grad_(False)
    student = be.load(gpt2_student)
    pair = TokenizerPair.of(AutoTokenizer.from_pretrained(tiny_pair[0]), load_tokenizer("gpt2"))
    obj = CrossTokenizerObjective(_cfg(f"kd.cross_tokenizer.kind={kind}"), student, teacher, pair,
                                  autocast=False, device="cpu")
    ids = pair.student(" ".join(SENTENCES * 3), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[:96]).view(2, 48)  # cuts through words, maybe characters, at the block edges
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        out = obj(batch, normalizer=float(trained_tokens(batch)))
        out.loss.backward()
        assert math.isfinite(float(out.loss.detach())) and float(out.kd) >= -1e-6 and out.tokens > 0
        grad = student.get_input_embeddings().weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        opt.step()


def test_make_objective_routes_the_cross_verdict(tiny_pair, gpt2_student, models):
    teacher, _ = models
    student = get_backend("hf").load(gpt2_student)
    alignment = align_vocab(tiny_pair[0], gpt2_student, cross_tokenizer=True)
    cfg = _cfg()
    obj = make_objective(cfg, student, teacher, None, alignment, autocast=False, device="cpu",
                         model_dirs=(tiny_pair[0], gpt2_student))
    assert isinstance(obj, CrossTokenizerObjective)
    with pytest.raises(ConfigError, match="folders"):
        make_objective(cfg, student, teacher, None, alignment, autocast=False, device="cpu")


def test_training_loop_runs_across_tokenizers(tiny_pair, gpt2_student, tmp_path):
    from kd.data import pack_dataset
    from kd.train.loop import train_student

    cfg = _cfg("train.steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.checkpoint_every=2")
    packed = pack_dataset(cfg.data, gpt2_student, max_positions=256, min_train_blocks=4)
    alignment = align_vocab(tiny_pair[0], gpt2_student, cross_tokenizer=True)
    result = train_student(cfg, tiny_pair[0], gpt2_student, alignment, packed, tmp_path / "run")
    assert result.steps == 2
    assert list((packed.root / "groups").glob("*/groups.json"))  # the objective read the groups stored beside the set
    assert math.isfinite(result.initial_loss) and math.isfinite(result.final_loss)


def test_pruned_student_on_another_tokenizer_is_built_once(tiny_pair):
    """student.init.tokenizer: the pruned tiny student transplanted onto GPT-2's tokenizer, cached."""
    import json

    from kd.config import ModelRef, RunConfig
    from kd.hub import pull_model

    teacher = pull_model(ModelRef(repo="tiny:teacher"), "teacher")
    ref = ModelRef(repo="from-teacher", init={"from_teacher": {"layers": [0, 1], "strategy": "even"}, "tokenizer": "gpt2"})
    snap = pull_model(ref, "student", teacher=teacher)
    again = pull_model(ref, "student", teacher=teacher)
    assert snap.local_dir == again.local_dir and snap.content_hash == again.content_hash  # built once
    cfg = json.loads((Path(snap.local_dir) / "config.json").read_text())
    assert cfg["vocab_size"] == 50257 and cfg["num_hidden_layers"] == 2
    info = snap.init.tokenizer
    assert info["tokenizer"] == "gpt2" and info["new_vocab"] == 50257
    assert info["kept"] + info["composed"] + info["unmapped"] == 50257 and info["kept"] > 0
    assert AutoTokenizer.from_pretrained(snap.local_dir)("hello")["input_ids"] == load_tokenizer("gpt2")("hello")["input_ids"]
    assert align_vocab(teacher.local_dir, snap.local_dir, cross_tokenizer=True).verdict == "cross-tokenizer"
    base = {"teacher": {"repo": "tiny:teacher"}, "student": ref.model_dump()}
    with pytest.raises(Exception, match="kd.cross_tokenizer.enabled"):
        RunConfig.model_validate(base)
    assert RunConfig.model_validate({**base, "kd": {"cross_tokenizer": {"enabled": True}}}).student.init.tokenizer == "gpt2"


def test_training_loop_on_chat_rendered_per_side(tiny_pair, gpt2_student, tmp_path):
    """Chat data across tokenizers (kd/cross_tokenizer/chat.py): the teacher (here given SmolLM2's template) and
    the GPT-2 student (no template of its own: it takes the teacher's, student.py) each render the conversations;
    the stored groups carry markup groups, the loop trains on the assistant contents with finite losses, and the
    objective counts exactly the plan's kept groups."""
    import shutil

    from kd.cross_tokenizer.chat import chat_templates
    from kd.cross_tokenizer.report import load_pair
    from kd.cross_tokenizer.stored import stored_groups, stored_rows
    from kd.cross_tokenizer.student import adopt_chat_template
    from kd.cross_tokenizer.vocab_files import TEACHER, tokenizer_folder
    from kd.data import pack_dataset
    from kd.data.encode import chat_template_of
    from kd.train.loop import train_student

    t_dir, s_dir = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(tiny_pair[0], t_dir)
    (t_dir / "chat_template.jinja").write_text(chat_template_of(tokenizer_folder(TEACHER)), encoding="utf-8")
    shutil.copytree(gpt2_student, s_dir)
    assert adopt_chat_template(s_dir, t_dir) == "teacher" and chat_templates(t_dir, s_dir)[1] is not None
    cfg = _cfg("data.source=bundled:chat/genesis-chat.jsonl", "data.format=chat", "data.train_on=assistant",
               "data.seq_len=256", f"data.prepared_dir={tmp_path / 'prepared'}", "train.steps=2",
               "train.batch_size=2", "train.warmup_steps=0", "train.checkpoint_every=2")
    packed = pack_dataset(cfg.data, s_dir, max_positions=256, min_train_blocks=4)
    alignment = align_vocab(t_dir, s_dir, cross_tokenizer=True)
    result = train_student(cfg, t_dir, s_dir, alignment, packed, tmp_path / "run")
    assert result.steps == 2 and math.isfinite(result.initial_loss) and math.isfinite(result.final_loss)
    pair = load_pair(t_dir, s_dir)
    groups = stored_groups(packed.root, pair, t_dir, s_dir)
    b = packed.train.batch(range(4))
    segs = stored_rows(groups, b)
    assert all(not s.content.all() for row in segs for s in row)  # every conversation has markup groups
    be = get_backend("hf")
    obj = CrossTokenizerObjective(cfg, be.load(s_dir), be.load(t_dir).eval().requires_grad_(False), pair,
                                  autocast=False, device="cpu", groups=groups)
    out = obj(b)
    plan = obj.plan(b)
    assert len(plan.eot_s) > 0  # the assistant turns' ends count too (losses.py's end-of-turn term)
    assert math.isfinite(float(out.loss.detach())) and out.tokens == int(plan.keep.sum()) + len(plan.eot_s) > 0
    cfg.kd.cross_tokenizer.end_of_turn = False
    obj.cfg = cfg
    assert obj(b).tokens == int(plan.keep.sum())
    from kd.evaluate.cross_tokenizer import evaluate_cross

    _, row = evaluate_cross([obj.teacher, obj.student], obj.teacher, packed.heldout, pair, batch_size=2, groups=groups)
    assert row.turn_ends > 0 and row.end_of_turn_kl >= 0 and 0 <= row.end_of_turn_gap <= 1  # held-out turn ends
