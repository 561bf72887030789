"""`make test` on a fresh clone, several times in a row, then beside CPU burners: is the suite green every
time, and how long does it take on this machine?

    python bench/make_test_repeats.py [--clone /tmp/kdflow-fresh] [--runs 3] [--burner-runs 1] [--burners 2]
    python bench/make_test_repeats.py --settings default,avx2,cbwr,avx512 --burner-runs 0 --empty-caches

--settings gives each quiet run in turn a CPU code path (issue 26: the suite must pass on machines whose MKL or
ATen pick other kernels): default, avx2 (MKL_ENABLE_INSTRUCTIONS=AVX2 and ATEN_CPU_CAPABILITY=avx2), avx512
(MKL_ENABLE_INSTRUCTIONS=AVX512), cbwr (MKL_CBWR=COMPATIBLE). --empty-caches starts every run from an empty
KDFLOW_HOME/PREFECT_HOME (the venv is kept), so each run trains and evaluates everything under its setting
instead of finding the previous run's results in Prefect's cache.

Clones this repository's HEAD into --clone (unless a clone is already there), installs nothing itself:
the first `make test` creates the clone's .venv from requirements.lock, as for a new user. KDFLOW_HOME and
PREFECT_HOME live inside the clone (as in .ci/run), so the first run starts from empty caches. A burner is
`python -c "while True: pass"`, one busy core each. Writes bench/results/make_test_repeats-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*?) in ([\d.]+)s", re.M)


SETTINGS = {"default": {}, "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
            "avx512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}, "cbwr": {"MKL_CBWR": "COMPATIBLE"}}


def make_test(clone: Path, log: Path, setting: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_ENABLE", "MKL_CBWR", "ATEN_CPU"))}
    env = dict(base, KDFLOW_HOME=str(clone / ".kdflow"), PREFECT_HOME=str(clone / ".kdflow" / "prefect"),
               **(setting or {}))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(["make", "test"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    text = log.read_text()
    found = SUMMARY.findall(text)
    # "1 error" / "2 errors": both count as failures
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", found[-1][0])} if found else {}
    return {"rc": rc, "wall_s": round(wall, 1), "pytest_s": float(found[-1][1]) if found else None,
            "summary": found[-1][0] if found else None, "failed": counts.get("failed", 0) + counts.get("error", 0),
            "passed": counts.get("passed", 0), "skipped": counts.get("skipped", 0),
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
            "log": str(log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clone", type=Path, default=Path("/tmp/kdflow-fresh"))
    ap.add_argument("--runs", type=int, default=3, help="quiet runs in a row")
    ap.add_argument("--burner-runs", type=int, default=1, help="runs beside the burners, after the quiet ones")
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--settings", default=None, help="comma-separated CPU paths, one per quiet run: " + ",".join(SETTINGS))
    ap.add_argument("--empty-caches", action="store_true", help="empty KDFLOW_HOME before every run")
    args = ap.parse_args()
    settings = args.settings.split(",") if args.settings else ["default"] * args.runs
    args.runs = len(settings)
    if not (args.clone / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(args.clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.clone, capture_output=True, text=True).stdout.strip()
    had_venv = (args.clone / ".venv" / ".installed").exists()
    runs = []
    for i in range(args.runs + args.burner_runs):
        burn = i >= args.runs
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners if burn else 0)]
        name = settings[i] if i < args.runs else "default"
        if args.empty_caches:
            subprocess.run(["rm", "-rf", str(args.clone / ".kdflow")], check=True)
        try:
            r = make_test(args.clone, Path(f"/tmp/make_test_run{i + 1}.log"), SETTINGS[name])
        finally:
            for b in burners:
                b.kill()
        runs.append({"run": i + 1, "burners": len(burners), "setting": name, "env": SETTINGS[name], **r})
        print(json.dumps(runs[-1]), flush=True)
    result = {"date": date.today().isoformat(), "commit": head, "cores": os.cpu_count(), "clone": str(args.clone),
              "venv_preexisting": had_venv, "empty_caches_each_run": args.empty_caches, "runs": runs,
              "all_green": all(r["rc"] == 0 and r["failed"] == 0 for r in runs)}
    out = REPO / "bench" / "results" / f"make_test_repeats-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(out)
    return 0 if result["all_green"] else 1


if __name__ == "__main__":
    sys.exit(main())
