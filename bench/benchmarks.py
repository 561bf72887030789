"""The SmolLM2 pruned preset with the bundled lm-eval tasks: the table, the wall time the benchmarks
added, and the same model folders scored by the plain `lm_eval` CLI with the same task YAML.

    .venv/bin/python bench/benchmarks.py                          # configs/smollm2-135m-pruned.yaml
    .venv/bin/python bench/benchmarks.py --limit 50 --screenshots docs/img --set train.steps=25

Method. A fresh temporary folder holds a Prefect server with its UI (SQLite), the evidence and work
dirs. The flow `distill` runs the preset in this process with `eval.benchmarks.tasks` = the three
bundled tasks (kdflow_lastword, kdflow_bpb, kdflow_mc), so the eval step scores teacher, student-before
and student-after in memory (HFLM around the models it already holds). Then, for each of the three
model folders (the teacher's converted folder, the pruned student-before, the trained checkpoint in
the evidence folder), the plain CLI

    lm_eval --model hf --model_args pretrained=DIR,dtype=float32,max_length=512 --batch_size 8 \
            --tasks kdflow_lastword,kdflow_bpb,kdflow_mc --include_path <prepared>/lm-eval-tasks-vN

runs in a subprocess, and every metric is compared with the manifest's (pass: |Δ| ≤ 1e-4). With
--screenshots DIR, headless Chromium (/usr/bin/chromium) photographs the run's Artifacts tab and the
`benchmarks` artifact page from the Prefect UI (the DOM is checked for the table's task names first).

Writes bench/results/benchmarks-<YYYY-MM-DD>.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_server import start_server  # bench/local_server.py (scripts run as `python bench/benchmarks.py`)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PRESET = ROOT / "configs" / "smollm2-135m-pruned.yaml"
TASKS = ["kdflow_lastword", "kdflow_bpb", "kdflow_mc"]
TOLERANCE = 1e-4
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=20000"]


def _cli_scores(model_dir: str, bundled: str, out: Path, limit: int | None, max_length: int, batch: int) -> tuple:
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
           f"pretrained={model_dir},dtype=float32,max_length={max_length}", "--batch_size", str(batch),
           "--tasks", ",".join(TASKS), "--include_path", bundled, "--output_path", str(out), "--device", "cpu"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DISABLE_MULTIPROC": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({proc.returncode}): {proc.stderr[-3000:]}")
    files = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    res = json.loads(Path(files[-1]).read_text())["results"]
    scores = {}
    for task, row in res.items():
        for key, v in row.items():
            if "," in key and "_stderr," not in key and isinstance(v, (int, float)):
                scores[f"{task}.{key.split(',')[0]}"] = float(v)
    return scores, wall, " ".join(cmd)


def _screenshots(base: str, flow_run_id: str, out_dir: Path, tmp: Path) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["benchmarks"])),
                                     flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    art = arts[0]

    def chromium(url: str, *mode: str, size: str) -> subprocess.CompletedProcess:
        profile = tmp / f"profile-{time.monotonic_ns()}"
        return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--window-size={size}", f"--user-data-dir={profile}",
                               *mode, url], capture_output=True, text=True, timeout=180, cwd=tmp)

    pages = {"prefect-ui-benchmarks.png": (f"{base}/v2/artifacts/artifact/{art.id}", "1600,900"),
             "prefect-ui-benchmarks-run-artifacts.png": (f"{base}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts",
                                                         "1600,1500")}
    found = {}
    for name, (url, size) in pages.items():
        dom = chromium(url, "--dump-dom", size=size)
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom.stdout, flags=re.S)))
        found[name] = {"url": url, "shows": [t for t in TASKS + ["benchmarks", "retention"] if t in text]}
        png = out_dir / name
        shot = chromium(url, f"--screenshot={png}", size=size)
        if shot.returncode != 0 or not png.is_file():
            raise RuntimeError(f"screenshot {name} failed: {shot.stderr[-2000:]}")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(PRESET))
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra section.field=value")
    ap.add_argument("--screenshots", default=None, help="folder for the Prefect UI screenshots (e.g. docs/img)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--from-tmp", default=None,
                    help="a folder kept by --keep: skip the flow run, score its folders with the CLI and photograph it")
    args = ap.parse_args(argv)

    tmp = Path(args.from_tmp) if args.from_tmp else Path(tempfile.mkdtemp(prefix="kdflow-bench-benchmarks-"))
    os.environ.setdefault("KDFLOW_HOME", str(Path.home() / ".cache" / "kdflow"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    server, base = start_server(tmp / "prefect", services=False)
    os.environ["PREFECT_API_URL"] = f"{base}/api"
    try:
        from flows.distill import distill
        from kd.config import load_config
        from kd.evidence.manifest import load_manifest
        from kd.evidence.verify import verify_run_dir

        day = dt.date.today().isoformat()
        sets = [f"evidence_dir={tmp / 'evidence'}", f"work_dir={tmp / 'runs'}", f"name=bench-benchmarks-{day}",
                f"eval.benchmarks.tasks=[{','.join(TASKS)}]"]
        if args.limit is not None:
            sets.append(f"eval.benchmarks.limit={args.limit}")
        if args.from_tmp:  # the run's own day and name, from the folder it left
            [run_dir] = [d for d in (tmp / "evidence").iterdir() if (d / "manifest.json").is_file()]
            day = run_dir.name.removeprefix("bench-benchmarks-")
            sets[2] = f"name={run_dir.name}"
        cfg = load_config(args.config, sets + args.overrides)
        run_dir = tmp / "evidence" / cfg.name
        result = None
        if not args.from_tmp:
            state = distill(cfg, return_state=True)
            result = state.result(raise_on_failure=False)
        m = load_manifest(run_dir)
        problems = verify_run_dir(run_dir)
        bench = m.eval.benchmarks
        flow_run_id = m.run.flow_run_id
        flow_wall = (m.run.end - m.run.start).total_seconds()  # the flow's own start and end, as recorded

        folders = {"teacher": m.models.teacher.local_dir, "student_before": m.models.student.local_dir,
                   "student_after": str(run_dir / m.checkpoint.path) if not Path(m.checkpoint.path).is_absolute()
                   else m.checkpoint.path}
        comparison, cli_cmds, cli_wall = {}, {}, {}
        for name, folder in folders.items():
            scores, wall, cmd = _cli_scores(folder, bench.bundled_dir, tmp / f"cli-{name}", args.limit,
                                            bench.max_length, cfg.eval.benchmarks.batch_size)
            cli_cmds[name], cli_wall[name] = cmd, wall
            for s in bench.scores:
                key = f"{s.task}.{s.metric}"
                a, b = s.values.get(name), scores.get(key)
                diff = None if a is None or b is None else abs(a - b)
                comparison[f"{name}/{key}"] = {"kdflow": a, "lm_eval_cli": b, "abs_diff": diff,
                                               "rel_diff": None if diff is None or not a else diff / abs(a)}
        diffs = [c["abs_diff"] for c in comparison.values()]
        rel = [c["rel_diff"] for c in comparison.values() if c["rel_diff"] is not None]
        same = all(d is not None and (d <= TOLERANCE or (c["rel_diff"] or 0) <= TOLERANCE)
                   for d, c in zip(diffs, comparison.values()))
        shots = _screenshots(base, flow_run_id, Path(args.screenshots), tmp) if args.screenshots and CHROMIUM.exists() \
            else None

        table = [{"task": s.task, "metric": s.metric, "higher_is_better": s.higher_is_better,
                  "teacher": s.values.get("teacher"), "student_before": s.values.get("student_before"),
                  "student_after": s.values.get("student_after"), "retention": s.retention,
                  "stderr": s.stderr} for s in bench.scores]
        out = {
            "date": day, "machine": {"platform": platform.platform(), "python": platform.python_version(),
                                      "cpus": os.cpu_count(), "device": m.environment.device},
            "config": args.config, "overrides": sets[3:] + args.overrides, "run": cfg.name,
            "status": m.run.status, "verify_problems": problems,
            "falsifiers": {f.id: f.verdict for f in m.falsifiers},
            "lm_eval_version": bench.lm_eval_version,
            "tasks": [t.model_dump() for t in bench.tasks],
            "table": table,
            "wall_s": {"flow": flow_wall, "benchmarks_total": bench.wall_s.get("total"),
                       "benchmarks_per_model": {k: v for k, v in bench.wall_s.items() if k != "total"},
                       "training": m.training.wall_s if m.training else None, "lm_eval_cli_per_model": cli_wall},
            "benchmarks_share_of_flow": (bench.wall_s.get("total") or 0) / flow_wall,
            "cli": {"commands": cli_cmds, "comparison": comparison, "max_abs_diff": max(d for d in diffs if d is not None),
                    "max_rel_diff": max(rel) if rel else None, "tolerance": TOLERANCE, "same_within_tolerance": same},
            "screenshots": shots, "flow_result": result if isinstance(result, dict) else str(result),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"benchmarks-{day}.json"
        path.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"{'task.metric':<34}{'teacher':>12}{'before':>12}{'after':>12}{'retention':>11}")
        for r in table:
            f = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
            print(f"{r['task'] + '.' + r['metric']:<34}{f(r['teacher']):>12}{f(r['student_before']):>12}"
                  f"{f(r['student_after']):>12}{f(r['retention']):>11}")
        print(f"flow {flow_wall:.1f} s, benchmarks {bench.wall_s.get('total'):.1f} s; lm_eval CLI max |Δ| "
              f"{out['cli']['max_abs_diff']:.3g} (same within {TOLERANCE:g}: {same}); status {m.run.status}; wrote {path}")
        return 0 if same and not problems else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        if not args.keep and not args.from_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
