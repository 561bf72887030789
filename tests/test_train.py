"""The training loop: loss falls, checkpoints are HF folders, a resumed run ends bit-for-bit equal."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.config import load_config
from kd.data import pack_dataset
from kd.errors import ConfigError
from kd.train import latest_checkpoint, lr_lambda, train_student
from kd.vocab import align_vocab


@pytest.fixture(scope="module")
def setup(tiny_pair):
    teacher, student = tiny_pair
    cfg = load_config("configs/smoke.yaml", ["train.steps=6", "train.checkpoint_every=3", "train.batch_size=4",
                                             "train.warmup_steps=1"])
    packed = pack_dataset(cfg.data, student, max_positions=256, min_train_blocks=4)
    return cfg, teacher, student, align_vocab(teacher, student), packed


def _weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def test_resume_is_bit_for_bit(setup, tmp_path):
    cfg, teacher, student, alignment, packed = setup
    straight = train_student(cfg, teacher, student, alignment, packed, tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash_after_3(row):
        if row["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train_student(cfg, teacher, student, alignment, packed, tmp_path / "resumed", on_step=crash_after_3)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-000003"
    resumed = train_student(cfg, teacher, student, alignment, packed, tmp_path / "resumed")
    assert resumed.resumed_from_step == 3 and straight.resumed_from_step == 0
    a, b = _weights(straight.checkpoint_dir), _weights(resumed.checkpoint_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(resumed.metrics_path)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated or lost metric lines
    assert resumed.final_loss == straight.final_loss and resumed.initial_loss == straight.initial_loss


def test_loss_falls_and_checkpoint_is_a_hf_folder(setup, tmp_path):
    cfg, teacher, student, alignment, packed = setup
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 12, "checkpoint_every": 0})})
    result = train_student(cfg, teacher, student, alignment, packed, tmp_path / "run")
    assert result.final_loss < result.initial_loss
    rows = [json.loads(line) for line in open(result.metrics_path)]
    assert len(rows) == 12 and {"loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(result.checkpoint_dir)
    AutoTokenizer.from_pretrained(result.checkpoint_dir)
    assert "step 12/12" in open(result.log_path).read()
    assert torch.equal(load_file(result.heldout_path)["heldout"], packed.heldout)  # what eval will read


def test_resume_from_a_non_checkpoint_is_refused(setup, tmp_path):
    cfg, teacher, student, alignment, packed = setup
    shutil.copytree(student, tmp_path / "not-a-ckpt")
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume_from": str(tmp_path / "not-a-ckpt")})})
    with pytest.raises(ConfigError, match="train.resume_from"):
        train_student(bad, teacher, student, alignment, packed, tmp_path / "run")


def test_schedule_warmup_then_cosine_to_floor():
    cfg = load_config("configs/smoke.yaml", ["train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(2, 10))
