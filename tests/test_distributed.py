"""Distributed training (issue 14) on CPU with gloo, world size 2, through real torchrun launches.

One single-process run is the reference (global batch 4). Against it: a DDP run (2 ranks x 2), an
FSDP2 run (teacher sharded too, activation checkpointing) through the Prefect task whose rank 1 is SIGKILLed after the step-3 checkpoint (the task
fails fast, the Prefect retry resumes from the DCP checkpoint), and a resume of that step-3 checkpoint
at world size 1 (DCP reshards 2 -> 1). Losses must agree at every step (1e-4 relative) and final
weights to 1e-4 (fp32). The consolidated HF folder loads with transformers and generates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from kd.config import load_config
from kd.data import pack_dataset
from kd.train.distributed import checkpoint as dckpt
from kd.train.distributed.launch import resolve_nproc, run_torchrun, supervise, torchrun_command
from kd.train.distributed.loop import train_distributed
from kd.train.distributed.runtime import process_group
from kd.errors import ConfigError, TransientError
from kd.train.loop import train_student
from kd.vocab import align_vocab

STEPS, CKPT_AT = 5, 3
BASE = [f"train.steps={STEPS}", f"train.checkpoint_every={CKPT_AT}", "train.warmup_steps=1", "train.lr=1e-3",
        "train.device=cpu", "train.dtype=float32", "train.rank_timeout_s=120"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cfg(*extra: str):
    return load_config("configs/smoke.yaml", BASE + list(extra))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run_dir: Path, ref_dir: Path, ckpt: str | Path, ref_ckpt: str | Path, from_step: int = 0):
    a, b = _losses(run_dir), _losses(ref_dir)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), 1):
        if step > from_step:
            assert x == pytest.approx(y, rel=1e-4), (step, a, b)
    wa, wb = load_file(str(Path(ckpt) / "model.safetensors")), load_file(str(Path(ref_ckpt) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def single(tiny_pair, tmp_path_factory):
    """The reference: one process, batch 4 (= 2 ranks x 2)."""
    teacher, student = tiny_pair
    cfg = _cfg("train.batch_size=4")
    packed = pack_dataset(cfg.data, student, max_positions=256, min_train_blocks=4)
    run = tmp_path_factory.mktemp("dist") / "single"
    result = train_student(cfg, teacher, student, align_vocab(teacher, student), packed, run)
    return result, packed


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(tiny_pair, single, tmp_path):
    teacher, student = tiny_pair
    ref, packed = single
    cfg = _cfg("train.batch_size=2", "train.distributed=ddp", "train.nproc_per_node=2")
    events: list[dict] = []
    result = run_torchrun(cfg, teacher, student, align_vocab(teacher, student), tmp_path / "ddp",
                          prepared_dir=getattr(packed, "root", None), on_event=events.append)
    assert [e["step"] for e in events if e["kind"] == "step"] == list(range(1, STEPS + 1))  # rank 0 only
    assert result.device == "cpu x2 (ddp)" and result.steps == STEPS
    assert result.initial_loss == pytest.approx(ref.initial_loss, rel=1e-4)
    assert result.final_loss == pytest.approx(ref.final_loss, rel=1e-4)
    _assert_same_run(tmp_path / "ddp", Path(ref.run_dir), result.checkpoint_dir, ref.checkpoint_dir)


@pytest.fixture(scope="module")
def fsdp_killed_then_retried(tiny_pair, single, tmp_path_factory, prefect_server):
    """FSDP2 through the real Prefect task: rank 1 SIGKILLs itself after the step-3 checkpoint; the
    task's retry resumes. Returns (flow run id, TrainResult, attempts, marker, run_dir)."""
    import os

    from prefect import flow

    import kd.train.distributed.launch as launch
    from kd.config import ModelRef
    from kd.hub import pull_model
    from tasks.train import train_student_task

    teacher_dir, student_dir = tiny_pair
    tmp = tmp_path_factory.mktemp("fsdp")
    # the teacher sharded too, and activation checkpointing: both must leave the numbers unchanged
    cfg = _cfg("train.batch_size=2", "train.distributed=fsdp", "train.nproc_per_node=2",
               "train.teacher_sharding=shard", "train.gradient_checkpointing=true", f"work_dir={tmp / 'runs'}")
    teacher, student = pull_model(ModelRef(repo="tiny:teacher"), "teacher"), pull_model(ModelRef(repo="tiny:student"), "student")
    alignment = align_vocab(teacher_dir, student_dir)
    marker = tmp / "killed.txt"
    attempts: list[dict] = []
    real = launch.run_torchrun

    def timed(*args, **kwargs):
        t0, err = time.monotonic(), None
        try:
            return real(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - recorded, re-raised
            err = e
            raise
        finally:
            attempts.append({"s": time.monotonic() - t0, "end": time.time(), "error": err})

    @flow(name="e14-distributed-train")
    def train_flow():
        task = train_student_task.with_options(retries=1, retry_delay_seconds=0, refresh_cache=True)
        return task(cfg, teacher, student, alignment, "fsdp-run")

    old = os.environ.get("KDFLOW_FAULT")
    os.environ["KDFLOW_FAULT"] = f"kill:1:{CKPT_AT}:{marker}"
    launch.run_torchrun = timed
    try:
        state = train_flow(return_state=True)
    finally:
        launch.run_torchrun = real
        os.environ.pop("KDFLOW_FAULT") if old is None else os.environ.update(KDFLOW_FAULT=old)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result(), attempts, marker, tmp / "runs" / "fsdp-run", cfg


@pytest.mark.slow
def test_fsdp_rank_killed_fails_fast_and_prefect_retry_resumes(fsdp_killed_then_retried, single):
    from tests.prefect_helpers import task_run

    flow_run_id, result, attempts, marker, run_dir, cfg = fsdp_killed_then_retried
    ref, _ = single
    assert marker.is_file()  # rank 1 really died (SIGKILL) after the step-3 checkpoint
    assert len(attempts) == 2 and isinstance(attempts[0]["error"], TransientError)
    assert "status" in str(attempts[0]["error"])  # torchrun's exit status, not our silence watchdog
    # failed within the timeout: torchrun saw the dead rank and stopped the survivor at once
    detect_s = attempts[0]["end"] - marker.stat().st_mtime
    assert detect_s < 60 < cfg.train.rank_timeout_s, detect_s
    assert task_run(flow_run_id, "train_student").run_count == 2  # one failure, one Prefect retry
    assert result.resumed_from_step == CKPT_AT and result.device == "cpu x2 (fsdp)"
    assert [json.loads(x)["step"] for x in Path(result.metrics_path).read_text().splitlines()] == list(range(1, 6))
    # steps 1-3 from the first attempt, 4-5 from the retry: all equal the single-process run
    _assert_same_run(run_dir, Path(ref.run_dir), result.checkpoint_dir, ref.checkpoint_dir)
    spec = str(run_dir / "launch" / "spec.json")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if spec in " ".join(p.info["cmdline"] or [])]
    assert not left, left  # no rank of either attempt outlived its job


@pytest.mark.slow
def test_resume_at_world_size_one_from_a_two_rank_checkpoint(fsdp_killed_then_retried, single, tiny_pair, tmp_path,
                                                            monkeypatch):
    _, _, _, _, run_dir, _ = fsdp_killed_then_retried
    ref, packed = single
    teacher, student = tiny_pair
    step3 = run_dir / "checkpoints" / f"step-{CKPT_AT:06d}"
    assert dckpt.read_state(step3)["world_size"] == 2
    assert len(list((step3 / dckpt.DCP_DIR).glob("*.distcp"))) == 2  # one shard file per rank
    resumed = tmp_path / "w1"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, resumed / "checkpoints" / step3.name)
    shutil.copy(run_dir / "metrics.jsonl", resumed / "metrics.jsonl")
    # one rank, same global batch (4 x 1 x 1), and DDP instead of FSDP: DCP reshards either way.
    # World size 1 runs in this process (a 1-rank gloo group), which saves a torchrun start.
    cfg = _cfg("train.batch_size=4", "train.distributed=ddp", "train.nproc_per_node=1")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    with process_group(timeout_s=120, device_pref="cpu") as env:
        result = train_distributed(cfg, teacher, student, align_vocab(teacher, student), packed, resumed, env)
    assert result.resumed_from_step == CKPT_AT and result.device == "cpu x1 (ddp)"
    _assert_same_run(resumed, Path(ref.run_dir), result.checkpoint_dir, ref.checkpoint_dir, from_step=CKPT_AT)


@pytest.mark.slow
def test_consolidated_student_loads_and_generates(fsdp_killed_then_retried):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = fsdp_killed_then_retried[1]
    ckpt = Path(result.checkpoint_dir)
    assert (ckpt / "model.safetensors").is_file() and (ckpt / dckpt.DCP_DIR / ".metadata").is_file()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = torch.tensor([tok.encode("the cat")])
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6 or int(out[0, -1]) == model.config.eos_token_id


def test_silent_job_is_killed_within_the_timeout(tmp_path):
    """A job that stops reporting (a hung rank) is killed, with its own-session grandchild (as torchrun
    starts ranks), and the task gets a TransientError: nothing hangs, nothing is left behind."""
    pidfile = tmp_path / "grandchild.pid"
    code = _sleeper_with_grandchild(pidfile, 'KDFLOW {"kind": "log", "msg": "up"}')
    events: list[dict] = []
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="no progress for"):
        supervise([sys.executable, "-c", code], timeout_s=2.0, on_event=events.append, grace_s=2.0)
    assert time.monotonic() - t0 < 15
    assert events == [{"kind": "log", "msg": "up"}]
    assert _gone(int(pidfile.read_text()))


def test_launch_command_and_rank_count():
    cfg = _cfg("train.distributed=fsdp", "train.nproc_per_node=2")
    cmd = torchrun_command(cfg, Path("/x/spec.json"))
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[-3:] == ["-m", "kd.train.distributed.worker", "/x/spec.json"]
    multi = _cfg("train.distributed=fsdp", "train.nproc_per_node=8", "train.rendezvous.nnodes=4",
                 "train.rendezvous.endpoint=head-0.kd:29500", "train.rendezvous.id=run-42")
    cmd = torchrun_command(multi, Path("s.json"))
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--rdzv-endpoint") + 1] == "head-0.kd:29500"
    with pytest.raises(ConfigError, match="train.rendezvous.endpoint"):
        torchrun_command(_cfg("train.distributed=ddp", "train.nproc_per_node=2", "train.rendezvous.nnodes=2"), Path("s"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.nproc_per_node"):
            resolve_nproc(_cfg("train.distributed=ddp"))


def test_bf16_autocast_trains_on_cpu(tiny_pair, single, tmp_path):
    """train.dtype=bfloat16 is no longer refused on CPU: the bf16 autocast path runs and learns."""
    teacher, student = tiny_pair
    _, packed = single
    cfg = load_config("configs/smoke.yaml", ["train.steps=3", "train.batch_size=4", "train.device=cpu",
                                             "train.dtype=bfloat16", "train.lr=2e-3", "train.warmup_steps=1"])
    result = train_student(cfg, teacher, student, align_vocab(teacher, student), packed, tmp_path / "bf16")
    assert result.dtype == "bfloat16-autocast" and result.device == "cpu"
    losses = _losses(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(losses))) and result.final_loss < result.initial_loss


def _sleeper_with_grandchild(pidfile: Path, first_line: str) -> str:
    """A stand-in for torchrun: starts a grandchild in its own session (as torchrun starts ranks)."""
    return ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print({first_line!r}, flush=True); time.sleep(300)")


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_cancellation_kills_the_whole_job(tmp_path):
    """An exception in the caller's thread (Prefect's cancellation, Ctrl-C) kills torchrun and its ranks."""
    pidfile = tmp_path / "grandchild.pid"
    code = _sleeper_with_grandchild(pidfile, 'KDFLOW {"kind": "log", "msg": "up"}')

    def cancel(event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        supervise([sys.executable, "-c", code], timeout_s=60, on_event=cancel, grace_s=2.0)
    assert _gone(int(pidfile.read_text()))


def test_input_error_of_rank_0_keeps_its_class(tiny_pair, tmp_path, monkeypatch):
    """torchrun exits 1 whatever its ranks exit with: the error class rank 0 reports decides (no retry)."""
    import kd.train.distributed.launch as launch
    from kd.errors import DataError

    line = 'KDFLOW {"kind": "error", "class": "DataError", "msg": "data.source: bad record at x.jsonl:3"}'
    monkeypatch.setattr(launch, "torchrun_command",
                        lambda cfg, spec: [sys.executable, "-c", f"import sys; print({line!r}); sys.exit(1)"])
    teacher, student = tiny_pair
    cfg = _cfg("train.distributed=ddp", "train.nproc_per_node=2")
    with pytest.raises(DataError, match="x.jsonl:3"):
        run_torchrun(cfg, teacher, student, align_vocab(teacher, student), tmp_path, on_event=lambda e: None)
    monkeypatch.setattr(launch, "torchrun_command", lambda cfg, spec: [sys.executable, "-c", "import sys; sys.exit(1)"])
    with pytest.raises(TransientError, match="status 1"):
        run_torchrun(cfg, teacher, student, align_vocab(teacher, student), tmp_path, on_event=lambda e: None)


def test_dcp_metadata_is_read_without_running_a_pickle(tmp_path):
    """DCP's `.metadata` is a pickle: kdflow's reader loads a real one and refuses a payload unrun."""
    import os
    import pickle

    import torch.distributed.checkpoint as dcp

    from kd.train.distributed.checkpoint import SafeReader
    from kd.errors import ConfigError

    model = torch.nn.Linear(3, 2)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "real"))
    assert "model.weight" in SafeReader(str(tmp_path / "real")).read_metadata().state_dict_metadata

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match=r"evil/\.metadata.*posix\.system"):
        SafeReader(str(tmp_path / "evil")).read_metadata()
    assert not marker.exists()
