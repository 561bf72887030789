"""Launch `torchrun` for a distributed training and supervise it from the training task.

    result = run_torchrun(cfg, teacher_dir, student_dir, alignment, run_dir, on_event=..., on_line=...)

The command is `python -m torch.distributed.run --standalone --nproc-per-node N -m kd.train.distributed.worker
SPEC.json` on one node, or `--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`
(train.rendezvous) on several (every node runs the same command). torchrun runs as a child in its own
session (process group), with `--max-restarts 0`: restarts are the task's retries, which resume from the
last checkpoint. The supervisor
  - streams rank 0's `KDFLOW {...}` lines to `on_event` (steps, log lines, the result) and every other
    output line to `on_line`;
  - fails when no rank-0 event came for `train.rank_timeout_s` (a hung rank: the others block in a
    collective, which also times out after rank_timeout_s inside the job), kills the job and raises;
  - on any exception in the caller's thread (cancellation, KeyboardInterrupt) kills the job and re-raises;
  - maps the outcome: exit 0 -> the TrainResult rank 0 wrote; an InputError rank 0 reported -> the same
    error class (not retried; torchrun itself exits 1 whatever its ranks exit with); anything else ->
    TransientError (retried; torchrun stops the surviving ranks when one dies).
Killing: SIGTERM to torchrun (it forwards it to its workers), then SIGKILL to torchrun and every
descendant (torchrun gives each worker its own session, so a process-group kill alone would miss them).
Workers also ask the kernel to SIGKILL them if torchrun dies (PR_SET_PDEATHSIG), so none outlives it.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from kd import errors
from kd.config import RunConfig
from kd.errors import ConfigError, TransientError
from kd.results import TrainResult, VocabAlignment

WORKER_MODULE = "kd.train.distributed.worker"
PREFIX = "KDFLOW "
KILL_GRACE_S = 10.0


def resolve_nproc(cfg: RunConfig) -> int:
    n = cfg.train.nproc_per_node
    if n != "auto":
        return int(n)
    gpus = torch.cuda.device_count() if cfg.train.device != "cpu" else 0
    if gpus < 1:
        raise ConfigError("train.nproc_per_node: auto means one rank per visible GPU and there is none here; "
                          "give a number (e.g. 2 for two CPU ranks)")
    return gpus


def torchrun_command(cfg: RunConfig, spec_path: Path, *, endpoint: str | None = None, rdzv_id: str | None = None,
                     store_is_elsewhere: bool = False, local_addr: str | None = None) -> list[str]:
    """The torchrun command line. nnodes > 1: `endpoint`/`rdzv_id` are the rendezvous the training step
    handed out (default: train.rendezvous.endpoint/id); `store_is_elsewhere`: the step hosts the c10d store,
    so no node tries to (`is_host=false`). A node that never joins fails the others after
    train.rank_timeout_s (`join_timeout`). `local_addr`: the address this node is reached at (torchrun
    looks it up from the host name otherwise)."""
    rdzv = cfg.train.rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(resolve_nproc(cfg)),
           "--max-restarts", "0", "--monitor-interval", "0.5"]
    if rdzv.nnodes == 1:
        cmd.append("--standalone")
    else:
        endpoint = endpoint or rdzv.endpoint
        if not endpoint:
            raise ConfigError(f"train.rendezvous.endpoint: needed when nnodes = {rdzv.nnodes} (host:port every "
                              "node can reach)")
        conf = f"join_timeout={max(1, int(cfg.train.rank_timeout_s))}" + (",is_host=false" if store_is_elsewhere else "")
        cmd += ["--nnodes", str(rdzv.nnodes), "--rdzv-backend", rdzv.backend, "--rdzv-endpoint", endpoint,
                "--rdzv-id", rdzv_id or rdzv.id, "--rdzv-conf", conf]
        if local_addr:
            cmd += ["--local-addr", local_addr]
    return cmd + ["-m", WORKER_MODULE, str(spec_path)]


def write_spec(cfg: RunConfig, teacher_dir: str | Path, student_dir: str | Path, alignment: VocabAlignment,
               run_dir: Path, prepared_dir: str | Path | None = None, teacher_cache=None, *,
               name: str = "spec.json", clear_result: bool = True) -> Path:
    """The worker's input (JSON, no pickle): config, model folders, alignment, where to write.
    `name`: the spec's file name under run_dir/launch (one per node when several nodes share run_dir);
    `clear_result`: remove a previous result.json (the multi-node step does that once, before any node starts)."""
    launch = run_dir / "launch"
    launch.mkdir(parents=True, exist_ok=True)
    result_path = launch / "result.json"
    if clear_result:
        result_path.unlink(missing_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "teacher_dir": str(Path(teacher_dir).resolve()),
            "student_dir": str(Path(student_dir).resolve()), "alignment": alignment.model_dump(mode="json"),
            "run_dir": str(run_dir.resolve()), "result_path": str(result_path.resolve()),
            "prepared_dir": str(Path(prepared_dir).resolve()) if prepared_dir else None,
            "teacher_cache": None if teacher_cache is None else teacher_cache.model_dump(mode="json")}
    path = launch / name
    path.write_text(json.dumps(spec, indent=1) + "\n")
    return path


def _set_parent_death_signal() -> None:
    """preexec_fn: if the process that launched torchrun dies, torchrun gets SIGTERM (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def kill_job(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM torchrun and its workers, then SIGKILL whatever is left after `grace_s`."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def supervise(cmd: list[str], *, timeout_s: float, on_event: Callable[[dict], None],
              on_line: Callable[[str], None] = lambda line: None, env: dict | None = None,
              cwd: str | Path | None = None, grace_s: float = KILL_GRACE_S,
              progress_file: Path | None = None) -> tuple[int, list[str], list[dict]]:
    """Run `cmd`, stream its lines, enforce the silence timeout. Returns (exit code, last lines, errors).
    `progress_file`: also counts as progress when its modification time is recent (a node whose ranks do
    not include rank 0 watches the events file rank 0's node appends to)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1, start_new_session=True, env=env, cwd=cwd,
                            preexec_fn=_set_parent_death_signal)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="torchrun-output").start()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    errors_seen: list[dict] = []
    last_event = time.monotonic()
    try:
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line.startswith(PREFIX):
                try:
                    event = json.loads(line[len(PREFIX):])
                except json.JSONDecodeError:
                    event = None
                if isinstance(event, dict):
                    last_event = time.monotonic()
                    if event.get("kind") == "error":
                        errors_seen.append(event)
                    on_event(event)
                    continue
            if line:
                tail.append(line)
                on_line(line)
            silent = time.monotonic() - last_event
            if progress_file is not None and silent > timeout_s:
                try:
                    silent = min(silent, time.time() - progress_file.stat().st_mtime)
                except OSError:
                    pass
            if silent > timeout_s:
                kill_job(proc, grace_s)
                raise TransientError(
                    f"training made no progress for {silent:.0f} s (train.rank_timeout_s={timeout_s:g}): a rank is "
                    f"hung or dead; killed torchrun and every rank. Last lines: {' | '.join(list(tail)[-5:])}")
    except BaseException:
        if proc.poll() is None:
            kill_job(proc, grace_s)
        raise
    return proc.wait(), list(tail), errors_seen


def run_torchrun(cfg: RunConfig, teacher_dir: str | Path, student_dir: str | Path, alignment: VocabAlignment,
                 run_dir: str | Path, *, prepared_dir: str | Path | None = None, teacher_cache=None,
                 on_event: Callable[[dict], None], on_line: Callable[[str], None] = lambda line: None) -> TrainResult:
    """Launch the job, wait for it, and return rank 0's TrainResult (or raise, see the module doc).
    `prepared_dir`: the prepared data set every rank opens (None: each rank packs `cfg.data` itself).
    `teacher_cache`: the offline teacher's TeacherCacheResult (kd.teacher_mode=offline)."""
    run_dir = Path(run_dir)
    spec = write_spec(cfg, teacher_dir, student_dir, alignment, run_dir, prepared_dir, teacher_cache)
    cmd = torchrun_command(cfg, spec)
    on_line("launch: " + " ".join(cmd))
    code, tail, errs = supervise(cmd, timeout_s=cfg.train.rank_timeout_s, on_event=on_event, on_line=on_line,
                                 env=worker_env())
    result_path = Path(json.loads(spec.read_text())["result_path"])
    if code == 0 and result_path.is_file():
        return TrainResult.model_validate_json(result_path.read_text())
    raise_for_exit(code, tail, errs)


def worker_env() -> dict:
    """This environment, with the repository first on PYTHONPATH (the worker imports kd/ and backends/)."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def raise_for_exit(code: int, tail: list[str], errs: list[dict]):
    """A failed torchrun: the InputError class rank 0 reported (no retry), else TransientError."""
    last = errs[-1] if errs else None
    # torchrun exits 1 whatever its ranks exited with, so the class rank 0 reported decides
    cls = getattr(errors, last.get("class", ""), None) if last is not None else None
    if isinstance(cls, type) and issubclass(cls, errors.InputError):
        raise cls(last["msg"])
    why = f"{last['class']}: {last['msg']}" if last else " | ".join(tail[-8:])
    raise TransientError(f"torchrun exited with status {code} ({why}); a retry resumes from the last checkpoint")
