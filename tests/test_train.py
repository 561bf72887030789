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
from kd.train.checkpoint import latest_checkpoint
from kd.train.loop import lr_lambda, train_student
from kd.vocab import align_vocab


@pytest.fixture(scope="module")
def setup(tiny_pair):
    teacher, student = tiny_pair
    cfg = load_config("configs/smoke.yaml", ["train.steps=6", "train.checkpoint_every=3", "train.batch_size=4",
                                             "train.warmup_steps=1"])
    packed = pack_dataset(cfg.data, student, max_positions=256, min_train_blocks=4)
    return cfg, teacher, student, align_vocab(teacher, student), packed


def weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def straight_and_resumed(cfg, teacher, student, alignment, packed, tmp_path, crash_at: int = 3):
    """One uninterrupted run, and one that crashes in step `crash_at` and is run again to resume."""
    straight = train_student(cfg, teacher, student, alignment, packed, tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash(row):
        if row["step"] == crash_at:
            raise Crash

    with pytest.raises(Crash):
        train_student(cfg, teacher, student, alignment, packed, tmp_path / "resumed", on_step=crash)
    checkpoint = latest_checkpoint(tmp_path / "resumed").name
    return straight, train_student(cfg, teacher, student, alignment, packed, tmp_path / "resumed"), checkpoint


def test_resume_is_bit_for_bit(setup, tmp_path):
    cfg, teacher, student, alignment, packed = setup
    straight, resumed, checkpoint = straight_and_resumed(cfg, teacher, student, alignment, packed, tmp_path)
    assert checkpoint == "step-000003"
    assert resumed.resumed_from_step == 3 and straight.resumed_from_step == 0
    a, b = weights(straight.checkpoint_dir), weights(resumed.checkpoint_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(resumed.metrics_path)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated or lost metric lines
    assert resumed.final_loss == straight.final_loss and resumed.initial_loss == straight.initial_loss

    # issue 9: another run resumes from this run's checkpoint (it carries the initial loss), no pickle anywhere
    step3 = tmp_path / "resumed" / "checkpoints" / "step-000003"
    assert not list(tmp_path.rglob("*.pt")) and (step3 / "trainer_state.json").is_file()
    other_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume_from": str(step3)})})
    other = train_student(other_cfg, teacher, student, alignment, packed, tmp_path / "other")
    c = weights(other.checkpoint_dir)
    assert other.resumed_from_step == 3 and all(torch.equal(a[k], c[k]) for k in a)
    assert other.initial_loss == straight.initial_loss and other.final_loss == straight.final_loss


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
    assert Path(result.heldout_path) == Path(packed.root).resolve()  # eval reads this prepared set's held-out split


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


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_from_a_pickle_never_runs_it(setup, tmp_path, capsys):
    """Issue 9.1: a folder with a trainer_state.pt payload named as resume_from is refused by name; no code runs."""
    cfg, teacher, student, alignment, packed = setup
    evil, marker = tmp_path / "evil-ckpt", tmp_path / "PWNED"
    shutil.copytree(student, evil)
    torch.save({"step": 1, "x": _Payload(marker)}, evil / "trainer_state.pt")
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume_from": str(evil)})})
    with pytest.raises(ConfigError, match=r"train.resume_from: .*trainer_state.pt.*never loads"):
        train_student(bad, teacher, student, alignment, packed, tmp_path / "run")
    assert not marker.exists()
    # through the real command: preflight names the file (exit 2) before Prefect starts; nothing is written
    from flows.cli import main

    assert main(["run", "configs/smoke.yaml", "--set", f"train.resume_from={evil}", "--set",
                 f"work_dir={tmp_path / 'runs'}", "--set", f"evidence_dir={tmp_path / 'ev'}"]) == 2
    err = capsys.readouterr().err
    assert f"train.resume_from: {evil} is not a kdflow checkpoint" in err and "trainer_state.pt" in err
    assert not marker.exists() and not (tmp_path / "ev").exists()
    with pytest.raises(Exception):  # the payload is live: loading it the old way would have run it
        torch.load(evil / "trainer_state.pt", weights_only=True)
    assert not marker.exists()


def test_trainer_state_round_trips_exactly(tmp_path):
    import random

    import numpy as np

    from kd.train.checkpoint import load_trainer_state, save_trainer_state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 7, "initial_loss": float("nan"), "optimizer": opt.state_dict(), "scheduler": {"last_epoch": 7},
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    save_trainer_state(tmp_path, state)
    back = load_trainer_state(tmp_path)
    assert back["step"] == 7 and back["initial_loss"] != back["initial_loss"]
    assert back["rng"]["python"] == state["rng"]["python"]
    n0, n1 = state["rng"]["numpy"], back["rng"]["numpy"]
    assert n1[0] == n0[0] and n1[1].dtype == n0[1].dtype and (n1[1] == n0[1]).all() and n1[2:] == n0[2:]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    o0, o1 = state["optimizer"], back["optimizer"]
    assert o1["param_groups"] == o0["param_groups"] and o1["state"].keys() == o0["state"].keys()
    assert all(torch.equal(o1["state"][i][k], o0["state"][i][k]) for i in o0["state"] for k in o0["state"][i])
