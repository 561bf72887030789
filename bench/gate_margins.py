"""How far from its threshold does each learning gate pass, for the training configs the tests use,
under each CPU code path a machine may pick? (issue 26.2)

    .venv/bin/python bench/gate_margins.py [--settings default,avx2,cbwr] [--configs orch,...]

Each (setting, config) runs `kdflow smoke` in a fresh process under that setting (MKL / ATen code path)
and reads the manifest: the smoke falsifier's initial → final probe loss and the KL gate's before → after,
as relative margins (a margin near 0 is a gate that another CPU's rounding could flip). The tiny pair
itself is pinned (kd/tiny.py), so what varies is only the training's own arithmetic.
Writes bench/results/gate_margins-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "cbwr": {"MKL_CBWR": "COMPATIBLE"},
}
# the overrides the flow tests train with (tests/prefect_helpers.py, tests/test_cache_reruns.py, tests/test_sweep.py)
CONFIGS = {
    "orch: 6 steps lr 1e-3": ["--steps", "6", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1"],
    "smoke preset (40 steps)": [],
}


def run(setting: dict, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "ATEN_"))} | setting
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "smoke", "--no-cache", "--evidence-dir", f"{tmp}/ev",
                               "--set", f"work_dir={tmp}/runs", *args], env=env, cwd=tmp, capture_output=True, text=True)
        (run_dir,) = Path(tmp, "ev").iterdir()
        manifest = json.loads((run_dir / "manifest.json").read_text())
        row = {"exit": proc.returncode, "status": manifest["run"]["status"], "wall_s": round(time.time() - t0, 1)}
        for f in manifest["falsifiers"]:
            nums = [float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", f["observed"])[:2]]
            if f["id"] in ("F-DISTILL-SMOKE-001", "F-DISTILL-EVAL-001") and len(nums) == 2:
                before, after = nums
                row[f["id"]] = {"before": before, "after": after, "verdict": f["verdict"],
                                "relative_margin": round((before - after) / before, 4)}
        return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--configs", default=None, help="comma-separated prefixes of CONFIGS keys")
    a = ap.parse_args()
    configs = {k: v for k, v in CONFIGS.items() if a.configs is None or any(k.startswith(p) for p in a.configs.split(","))}
    rows = []
    for name, args in configs.items():
        for s in a.settings.split(","):
            r = run(SETTINGS[s], args) | {"config": name, "setting": s}
            rows.append(r)
            print(json.dumps(r), flush=True)
    date = datetime.date.today().isoformat()
    out = ROOT / "bench" / "results" / f"gate_margins-{date}.json"
    out.write_text(json.dumps({"date": date, "settings": SETTINGS, "configs": configs, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
