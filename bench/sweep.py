"""Sweep bench (issue 18): the 6-trial smoke sweep against 6 separate `kdflow run`s, the fault case, and a
screenshot of the sweep summary artifact in the Prefect UI.

    python bench/sweep.py                      # writes bench/results/sweep-<date>.json
    python bench/sweep.py --no-baseline        # skip the 6 separate runs
    python bench/sweep.py --screenshot docs/img/prefect-ui-sweep-summary.png

One real Prefect server (`prefect server start --ui`, SQLite, fresh PREFECT_HOME) serves every run, so
the numbers exclude server start-up on both sides. Every count is read back from that server's API:
the parent's shared-step task runs, each child distill run's task states (Cached or not), which trial
tasks ran or were Cached on the rerun. Fresh KDFLOW_HOME, teacher cache store and Prefect result store
per side: the sweep and the baseline each start with nothing built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

import yaml

from local_server import start_server  # bench/local_server.py (scripts run as `python bench/sweep.py`)

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "configs" / "sweeps" / "smoke-alpha-temperature.yaml"
SHARED = ("pull_models", "check_vocab", "prepare_data", "cache_teacher_logits")
CHROMIUM = Path("/usr/bin/chromium")


def env_for(base: str, home: Path) -> dict:
    """A kdflow process talking to the bench server, with its own caches under `home`."""
    return {**os.environ, "PREFECT_API_URL": f"{base}/api", "PREFECT_UI_URL": base, "KDFLOW_HOME": str(home / "kdflow"),
            "PREFECT_HOME": str(home / "prefect-home"), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
            "PYTHONPATH": str(REPO), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "OMP_WAIT_POLICY": "PASSIVE"}


def kdflow(args: list[str], env: dict, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                            cwd=REPO).returncode
    return rc, time.perf_counter() - t0


# ---------------------------------------------------------------- API read-backs
def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_run_named(name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with client() as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                                sort=FlowRunSort.START_TIME_DESC)


def children(parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with client() as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(str(parent_id))])))


def task_runs(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))


def step(name: str) -> str:
    return name.rsplit("-", 1)[0]


def settled_task_runs(flow_run_id, ready, timeout_s: float = 60) -> list:
    """The flow run's task runs once `ready(runs)` and none is still running (the server records task runs
    from events, a moment after the flow returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = task_runs(flow_run_id)
        if (ready(runs) and all(r.state.name not in ("Running", "Pending", "Scheduled") for r in runs)) \
                or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def sweep_readback(sweep_run, evidence: Path) -> dict:
    from kd.evidence.verify import verify_sweep_dir

    n_trials = len(json.loads((evidence / "sweep.json").read_text())["trials"])
    parent_tasks = settled_task_runs(sweep_run.id, lambda rs: sum(r.name.startswith("trial-") for r in rs) == n_trials)
    shared_in_parent = {}
    for r in parent_tasks:
        if step(r.name) in SHARED:
            shared_in_parent.setdefault(step(r.name), []).append(r.state.name)
    kids = children(sweep_run.id)
    per_child = {}
    for k in kids:
        runs = settled_task_runs(k.id, lambda rs: any(step(r.name) == "write_evidence" for r in rs))
        states = {step(r.name): r.state.name for r in runs}
        per_child[k.name] = {"state": k.state.name, **{s: states.get(s) for s in (*SHARED, "train_student")}}
    trial_tasks = {r.name: r.state.name for r in parent_tasks if r.name.startswith("trial-")}
    doc = json.loads((evidence / "sweep.json").read_text())
    return {
        "sweep_flow_run": str(sweep_run.id), "sweep_state": sweep_run.state.name,
        "shared_steps_in_parent": shared_in_parent, "child_runs": per_child, "trial_tasks": trial_tasks,
        "children_with_all_shared_steps_cached": sum(all(v[s] == "Cached" for s in SHARED) for v in per_child.values()),
        "evidence_folders": sorted(p.parent.name for p in evidence.glob("*/manifest.json")),
        "best": doc["best"], "ranking": doc["ranking"], "failed": doc["failed"], "reused": doc.get("reused"),
        "table": [{k: r.get(k) for k in ("name", "overrides", "status", "objective", "kl", "top1", "tokens_per_s",
                                          "train_wall_s", "wall_s")} for r in doc["trials"]],
        "verify_problems": verify_sweep_dir(evidence),
    }


def screenshot(base: str, sweep_run_id, out: Path, tmp: Path) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with client() as c:
        (art,) = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(sweep_run_id))]),
            key=ArtifactFilterKey(any_=["sweep-summary"])))
    shots = {"summary": f"{base}/v2/artifacts/artifact/{art.id}",
             "run": f"{base}/v2/runs/flow-run/{sweep_run_id}"}  # the graph: trials and their distill subflows
    done = {}
    for what, url in shots.items():
        png = out if what == "summary" else out.with_name(out.stem.replace("summary", "subflows") + out.suffix)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1300",
                 "--virtual-time-budget=20000", f"--user-data-dir={tmp / ('chrome-' + what)}", f"--screenshot={png}"]
        p = subprocess.run([str(CHROMIUM), *flags, url], capture_output=True, text=True, timeout=180, cwd=tmp)
        done[what] = {"url": url, "png": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png),
                      "rc": p.returncode, "bytes": png.stat().st_size if png.is_file() else 0}
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-fault", action="store_true")
    ap.add_argument("--screenshot", type=Path, default=REPO / "docs" / "img" / "prefect-ui-sweep-summary.png")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                    f"sweep-{datetime.now(timezone.utc):%Y-%m-%d}.json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kdflow-bench-sweep-"))
    proc, base = start_server(tmp / "server")
    os.environ.update(PREFECT_API_URL=f"{base}/api", PREFECT_HOME=str(tmp / "bench-client"))
    spec = yaml.safe_load(SPEC.read_text())
    out: dict = {"bench": "sweep", "date": datetime.now(timezone.utc).isoformat(), "host": platform.node(),
                 "cpus": os.cpu_count(), "spec": str(SPEC.relative_to(REPO)), "server": base}
    try:
        # 1. the sweep, from nothing built
        side = tmp / "sweep"
        side.mkdir()
        rc, wall = kdflow(["sweep", str(SPEC), "--evidence-dir", str(side / "evidence"), "--work-dir",
                           str(side / "runs")], env_for(base, side), side / "sweep.log")
        (run,) = flow_run_named(f"sweep-{spec['name']}")[:1]
        out["sweep"] = {"exit_code": rc, "wall_s": round(wall, 1),
                        **sweep_readback(run, side / "evidence" / spec["name"])}
        if CHROMIUM.exists() and args.screenshot:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            out["screenshots"] = screenshot(base, run.id, args.screenshot, tmp)
        # 2. the same trials as 6 separate `kdflow run`s, one after another, from nothing built
        if not args.no_baseline:
            from kd.sweep.spec import expand, validate_spec

            side = tmp / "baseline"
            side.mkdir()
            runs, total = [], 0.0
            for t in expand(validate_spec(spec)):
                sets = [*spec["set"], *(f"{k}={v}" for k, v in t.overrides.items()), f"name={t.name}"]
                a = ["run", spec["base"], "--evidence-dir", str(side / "evidence"),
                     *(x for s in sets for x in ("--set", s))]
                a += ["--set", f"work_dir={side / 'runs'}"]
                rc, wall = kdflow(a, env_for(base, side), side / f"{t.name}.log")
                runs.append({"trial": t.name, "exit_code": rc, "wall_s": round(wall, 1)})
                total += wall
            out["separate_runs"] = {"runs": runs, "total_wall_s": round(total, 1)}
            out["sweep_vs_separate_wall_ratio"] = round(out["sweep"]["wall_s"] / total, 3)
        # 3. the fault case: two good trials and one no model can pass (better-than-uniform gate at 1e-9 x vocab); rerun
        if not args.no_fault:
            side = tmp / "fault"
            side.mkdir()
            fspec = {**spec, "name": "smoke-fault", "grid": {"kd.alpha": [0.1, 0.3], "kd.temperature": [1.0]},
                     "trials": [{"eval.uniform_perplexity_fraction": 1e-9}]}
            (side / "spec.yaml").write_text(yaml.safe_dump(fspec, sort_keys=False))
            res = {}
            for attempt in ("first", "rerun"):
                rc, wall = kdflow(["sweep", str(side / "spec.yaml"), "--evidence-dir", str(side / "evidence"),
                                   "--work-dir", str(side / "runs")], env_for(base, side), side / f"{attempt}.log")
                (run,) = flow_run_named("sweep-smoke-fault")[:1]
                res[attempt] = {"exit_code": rc, "wall_s": round(wall, 1),
                                "last_line": (side / f"{attempt}.log").read_text().strip().splitlines()[-1][:400],
                                **sweep_readback(run, side / "evidence" / "smoke-fault")}
            out["fault"] = res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps({k: out[k] for k in out if k not in ("sweep", "fault")}, indent=2, default=str))
    print(f"wrote {args.out}; work folder {tmp}")
    shutil.rmtree(tmp / "baseline" / "runs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
