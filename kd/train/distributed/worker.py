"""torchrun entry point: `python -m torch.distributed.run ... -m kd.train.distributed.worker SPEC.json`.

SPEC.json (written by kd.train.distributed.launch.write_spec) holds the validated config, the model
folders, the vocab alignment and the run folder. Every rank loads the data and both models, joins
the process group and runs kd.train.distributed.loop. Rank 0 alone talks on stdout, one line per event,
`KDFLOW {"kind": "step"|"log"|"error"|"result", ...}`, which the launcher streams into the Prefect run
log and progress artifact; it also writes the TrainResult to `spec["result_path"]`.

Exit status: 0 done, 2 invalid input (InputError: the launcher raises the same class, no retry),
1 anything else (the launcher raises TransientError: a retry resumes from the last checkpoint).

KDFLOW_FAULT=kill|hang:RANK:STEP:MARKER (tests only) makes rank RANK SIGKILL itself, or hang, right
after step STEP (and its checkpoint), once (MARKER is created first, so the retry runs through).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

PREFIX = "KDFLOW "


def emit(kind: str, row: dict) -> None:
    print(PREFIX + json.dumps({"kind": kind, **row}, default=str), flush=True)


def load_data(cfg, spec: dict):
    """The training/held-out data: the prepared set the task was given (memory-mapped, every rank opens
    it and reads only its rows), else packed here as the in-process task would."""
    if spec.get("prepared_dir"):
        from kd.data import open_prepared

        return open_prepared(spec["prepared_dir"])
    from kd.data import model_max_positions, pack_dataset

    student_dir = spec["student_dir"]
    return pack_dataset(cfg.data, student_dir, max_positions=model_max_positions(student_dir),
                        min_train_blocks=cfg.train.batch_size * int(os.environ.get("WORLD_SIZE", "1")))


def _fault_hook(rank: int):
    spec = os.environ.get("KDFLOW_FAULT")
    if not spec:
        return None
    action, want_rank, want_step, marker = spec.split(":", 3)

    def hook(done_step: int) -> None:
        if rank == int(want_rank) and done_step == int(want_step) and not Path(marker).exists():
            Path(marker).write_text(f"rank {rank}: {action} after step {done_step}\n")
            if action == "hang":
                import time

                time.sleep(10**9)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _die_with_parent() -> None:
    """torchrun puts each rank in its own session; if torchrun is killed, the kernel kills us too (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str]) -> int:
    from kd.config import RunConfig
    from kd.train.distributed.loop import train_distributed
    from kd.train.distributed.runtime import process_group
    from kd.errors import InputError
    from kd.results import VocabAlignment

    _die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        if rank == 0:  # progress events also keep the launcher's silence timeout from firing while loading
            emit("log", {"msg": f"worker up (world size {os.environ.get('WORLD_SIZE', '1')})"})
        cfg = RunConfig.model_validate(spec["config"])
        packed = load_data(cfg, spec)
        cache = None
        if spec.get("teacher_cache"):
            from kd.results import TeacherCacheResult

            cache = TeacherCacheResult.model_validate(spec["teacher_cache"])
        with process_group(timeout_s=cfg.train.rank_timeout_s, device_pref=cfg.train.device) as env:
            result = train_distributed(cfg, spec["teacher_dir"], spec["student_dir"],
                                       VocabAlignment.model_validate(spec["alignment"]), packed, spec["run_dir"],
                                       env, emit=emit, after_checkpoint=_fault_hook(env.rank), teacher_cache=cache)
        if result is not None:
            tmp = Path(spec["result_path"] + ".tmp")
            tmp.write_text(result.model_dump_json(indent=1) + "\n")
            os.replace(tmp, spec["result_path"])
            emit("result", {"path": spec["result_path"]})
        return 0
    except InputError as err:
        if rank == 0:
            emit("error", {"class": type(err).__name__, "msg": str(err)})
        return 2
    except Exception as err:  # noqa: BLE001 - reported, then exit 1 (the launcher makes it retryable)
        traceback.print_exc()
        if rank == 0:
            emit("error", {"class": type(err).__name__, "msg": str(err)[:2000]})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
