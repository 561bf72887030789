"""Multi-node training through Prefect, the full demo (issue 19): runs tests/test_multinode.py with
KDFLOW_MULTINODE_FULL=1 and records the measured numbers.

    .venv/bin/python bench/multinode.py            # ~10 min on 2 shared CPU cores

Two `prefect worker start --pool gpu` processes act as two nodes (1 CPU rank each, gloo, DDP) on a
fresh Prefect server (the tests' session server):
  - two_nodes_vs_one_node: the smoke preset (6 steps) through the distill flow, trained by 2 nodes x 1
    rank, against 1 node x 2 ranks (torchrun direct, same prepared data): max |loss diff| and max |weight
    diff|, wall times; the evidence verifies.
  - node_killed_then_retried: rank 1 pauses after the step-3 checkpoint and its node (worker, flow-run
    process, torchrun, rank) is SIGKILLed; stop latency = kill -> every process of that attempt gone;
    the task's retry (a replacement worker) resumes from step 3; max |weight diff| vs the uninterrupted run.
  - step_cancelled: Ctrl-C in the training step: both node runs Cancelled, no process left.
  - lean: the suite's version (training task in a small flow).
Writes bench/results/multinode-<YYYY-MM-DD>.json (the test-recorded numbers plus pytest's outcome).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    out = ROOT / "bench" / "results" / f"multinode-{dt.date.today().isoformat()}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "KDFLOW_MULTINODE_FULL": "1", "KDFLOW_MULTINODE_RESULTS": str(out),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10",
                           "tests/test_multinode.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    data = json.loads(out.read_text()) if out.is_file() else {}
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line][-1:]
    data["meta"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "host": f"{platform.node()} ({os.cpu_count()} CPUs, shared)", "python": platform.python_version(),
                    "pytest_exit": proc.returncode, "pytest_summary": summary[0] if summary else None,
                    "durations": [line for line in proc.stdout.splitlines() if line.strip().endswith("]")
                                  or " call " in line or " setup " in line][:12],
                    "wall_s": round(wall, 1),
                    "not_run": "GPUs/NCCL, several hosts, a Kubernetes cluster: no GPU and no cluster here"}
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(proc.stdout[-4000:])
    print(f"wrote {out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
