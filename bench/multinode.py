"""Multi-node training through Prefect, the full demo (issue 19): runs tests/test_multinode.py with
KDFLOW_MULTINODE_FULL=1 and records the measured numbers.

    .venv/bin/python bench/multinode.py [OUT.json]  # ~15 min on 2 shared CPU cores

Two `prefect worker start --pool gpu` processes act as two nodes (1 CPU rank each, gloo, DDP) on a
fresh Prefect server (the tests' session server):
  - two_nodes_vs_one_node: the smoke preset (6 steps) through the distill flow, trained by 2 nodes x 1
    rank, against 1 node x 2 ranks (torchrun direct, same prepared data): max |loss diff| and max |weight
    diff|, wall times; the evidence verifies.
  - node_killed_then_retried: rank 1 pauses after the step-3 checkpoint and its node (worker, flow-run
    process, torchrun, rank) is SIGKILLed; stop latency = kill -> every process of that attempt gone;
    the task's retry (a replacement worker) resumes from step 3; max |weight diff| vs the uninterrupted run.
  - rank0_node_killed_then_retried: the same with rank 0's node (the one whose events the step streams).
  - step_cancelled: Ctrl-C in the training step: both node runs Cancelled, no process left.
  - parent_cancelled_through_api: distill/manual on a `cpu` process worker, cancelled through Prefect's API
    while its two node runs train: parent and both node runs Cancelled, no process left.
  - lean: the suite's version (training task in a small flow).
Writes bench/results/multinode-<YYYY-MM-DD>.json, or OUT.json (the test-recorded numbers, pytest's outcome
per test, and the versions it ran on: the locked Prefect, SQLAlchemy, torch).
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
    out = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else \
        ROOT / "bench" / "results" / f"multinode-{dt.date.today().isoformat()}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "KDFLOW_MULTINODE_FULL": "1", "KDFLOW_MULTINODE_RESULTS": str(out),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--durations=12", "tests/test_multinode.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    data = json.loads(out.read_text()) if out.is_file() else {}
    lines = proc.stdout.splitlines()
    summary = [x for x in lines if any(w in x for w in (" passed", " failed", " error"))][-1:]
    start = next((i for i, x in enumerate(lines) if "slowest" in x and "durations" in x), len(lines))
    durations = [x for x in lines[start + 1:] if x[:1].isdigit()]
    outcomes = {x.split(" ", 1)[1].split(" - ")[0]: x.split(" ", 1)[0] for x in lines
                if x.split(" ", 1)[0] in ("PASSED", "FAILED", "ERROR", "SKIPPED") and "::" in x}
    from importlib.metadata import version
    data["meta"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "host": f"{platform.node()} ({os.cpu_count()} CPUs, shared)", "python": platform.python_version(),
                    "pytest_exit": proc.returncode, "pytest_summary": summary[0] if summary else None,
                    "durations": durations, "outcomes": outcomes,
                    "versions": {p: version(p) for p in ("prefect", "sqlalchemy", "torch", "transformers", "pytest")},
                    "wall_s": round(wall, 1),
                    "not_run": "GPUs/NCCL, several hosts, a Kubernetes cluster: no GPU and no cluster here"}
    out.write_text(json.dumps(data, indent=1) + "\n")
    log = out.with_suffix(".log")
    log.write_text(proc.stdout + proc.stderr)  # the whole pytest output, failures included
    print(proc.stdout[-4000:])
    print(f"wrote {out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
