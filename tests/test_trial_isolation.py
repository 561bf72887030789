"""Issue 26: a sweep's trials are threads of one process, so nothing a trial draws may come from (or
disturb) the process-wide random generators. Two trials trained at the same time in two threads end
with exactly the weights each ends with alone: on-policy sampling (each micro-batch's draws come from
its own torch.Generator) and dropout (a run's own RNG stream, swapped in under a lock) both checked."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kd.config import load_config
from kd.data import pack_dataset
from kd.train.loop import train_student
from kd.vocab import align_vocab
from tests.test_train import weights

OP = ["train.steps=3", "train.checkpoint_every=2", "train.batch_size=2", "train.warmup_steps=1", "train.lr=2e-3",
      "kd.on_policy.fraction=1", "kd.on_policy.max_new_tokens=16", "kd.on_policy.prompt_tokens=8",
      "kd.on_policy.temperature=2.0", "train.device=cpu", "train.dtype=float32"]


@pytest.fixture(scope="module")
def pair(tiny_pair, tmp_path_factory):
    teacher, student = tiny_pair
    cfg = load_config("configs/smoke.yaml", OP)
    packed = pack_dataset(cfg.data, student, max_positions=256, min_train_blocks=4)
    # the same student with attention dropout: its training forward draws from a random generator
    dropout = tmp_path_factory.mktemp("dropout-student") / "student"
    shutil.copytree(student, dropout)
    conf = json.loads((dropout / "config.json").read_text())
    assert "attention_dropout" in conf  # the field the attention reads in train mode
    conf["attention_dropout"] = 0.3
    (dropout / "config.json").write_text(json.dumps(conf))
    return teacher, student, dropout, align_vocab(teacher, student), packed


def _run(teacher, student, al, packed, run_dir, seed, extra, start=None):
    cfg = load_config("configs/smoke.yaml", OP + [f"train.seed={seed}"] + extra)
    if start is not None:
        start.wait()  # both threads enter training together
    return weights(train_student(cfg, teacher, student, al, packed, run_dir).checkpoint_dir)


# sampling: every batch on-policy, no dropout; dropout: no sampling (off-policy batches), dropout only
@pytest.mark.parametrize("which", ["sampling", "dropout"])
def test_concurrent_trials_end_with_the_weights_they_end_with_alone(pair, tmp_path, which):
    teacher, student, dropout, al, packed = pair
    model, extra = (dropout, ["kd.on_policy.fraction=0"]) if which == "dropout" else (student, [])
    alone = {s: _run(teacher, model, al, packed, tmp_path / f"alone-{s}", s, extra) for s in (1, 2)}
    assert any(not torch.equal(alone[1][k], alone[2][k]) for k in alone[1])  # two different trials
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        futures = {s: pool.submit(_run, teacher, model, al, packed, tmp_path / f"together-{s}", s, extra, start)
                   for s in (1, 2)}
        together = {s: f.result() for s, f in futures.items()}
    for s in (1, 2):
        diff = [k for k in alone[s] if not torch.equal(alone[s][k], together[s][k])]
        assert not diff, f"trial seed {s}: {len(diff)} tensors differ from the trial run alone, e.g. {diff[:3]}"


def test_resumed_dropout_run_equals_uninterrupted(pair, tmp_path):
    """The run's own RNG stream is in the checkpoint: a resumed run with dropout draws the same masks."""
    from tests.test_train import straight_and_resumed

    teacher, _, dropout, al, packed = pair
    cfg = load_config("configs/smoke.yaml", OP + ["train.steps=4", "kd.on_policy.fraction=0.5"])
    straight, resumed, checkpoint = straight_and_resumed(cfg, teacher, dropout, al, packed, tmp_path)
    assert checkpoint == "step-000002" and resumed.resumed_from_step == 2
    a, b = weights(straight.checkpoint_dir), weights(resumed.checkpoint_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
