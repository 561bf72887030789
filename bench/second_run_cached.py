"""Two runs on the same data through the real `kdflow` CLI: the second must show every data-side step Cached.

    python bench/second_run_cached.py                                  # SmolLM2 chat preset, fresh KDFLOW_HOME
    python bench/second_run_cached.py --config configs/smoke.yaml --steps 4

Run 1 and run 2 differ only in `train.lr`. Both run in a fresh `$KDFLOW_HOME` and `$PREFECT_HOME` (so run 1
converts the GGUF teacher, prunes the student and prepares the data itself: the case where a key that
holds "the output folder exists" can never be hit). Afterwards the task runs of run 2 are read from the API
(the runs are over: their states have long been delivered) next to what each manifest's lineage says.
Writes bench/results/second_run_cached-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_STEPS = ("pull_models", "check_vocab", "prepare_data")


def task_states(flow_run_id: str) -> dict[str, str]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state is not None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m-chat.yaml")
    ap.add_argument("--lr", nargs=2, default=["3e-4", "1e-4"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kdflow-second-run-"))
    env = {**os.environ, "KDFLOW_HOME": str(tmp / "home"), "PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)  # each CLI run starts its embedded server on the same database
    runs = []
    for i, lr in enumerate(args.lr):
        cmd = [str(Path(sys.executable).parent / "kdflow"), "run", args.config, "--set", f"train.lr={lr}",
               "--evidence-dir", str(tmp / "evidence"), "--set", f"work_dir={tmp / 'runs'}"]
        if args.steps:
            cmd += ["--set", f"train.steps={args.steps}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        run_dir = max((tmp / "evidence").iterdir(), key=lambda p: p.stat().st_mtime)
        m = json.loads((run_dir / "manifest.json").read_text())
        runs.append({"run": m["run"]["name"], "flow_run_id": m["run"]["flow_run_id"], "exit": done.returncode,
                     "status": m["run"]["status"], "wall_s": round(wall, 1), "lr": lr,
                     "lineage": {k: {"cached": v["cached"], "produced_by_run": v["produced_by_run"]}
                                 for k, v in m["lineage"].items()}})
        print(json.dumps(runs[-1]), flush=True)
    os.environ.update(PREFECT_HOME=env["PREFECT_HOME"], DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    os.environ.pop("PREFECT_API_URL", None)
    for r in runs:
        r["task_states_from_api"] = task_states(r["flow_run_id"])
    second = runs[1]
    summary = {"date": dt.date.today().isoformat(), "config": args.config, "runs": runs,
               "second_run_data_steps_cached_in_manifest": all(second["lineage"][s]["cached"] for s in DATA_STEPS),
               "second_run_data_steps_cached_on_api": all(second["task_states_from_api"].get(s) == "Cached"
                                                          for s in DATA_STEPS)}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    out = args.out or REPO / "bench" / "results" / f"second_run_cached-{summary['date']}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
