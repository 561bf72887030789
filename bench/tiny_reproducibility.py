"""Is the tiny smoke pair the same whatever code path the CPU's libraries pick? (issue 26.1)

    .venv/bin/python bench/tiny_reproducibility.py     # ~3 minutes on 2 cores

For each CPU-path setting a machine might impose (MKL's AVX2 / AVX-512 paths, MKL's conditional
numerical reproducibility, ATen's AVX2 / scalar kernels), builds the pair twice in fresh processes:
- `pinned`: through `kd.tiny.make_tiny`, as `make smoke` and the tests do (the generation runs in a
  child pinned to the code paths every x86-64 CPU has);
- `unpinned`: the same generation called directly under that setting (what kdflow did before).
Records the weights' sha256 and the teacher's final CE; writes bench/results/tiny_reproducibility-DATE.json.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "machine default": {},
    "MKL_ENABLE_INSTRUCTIONS=AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL_ENABLE_INSTRUCTIONS=AVX512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
}
PINNED = "from kd.tiny import make_tiny; make_tiny({out!r})"
UNPINNED = "import torch; from kd.tiny import _generate; torch.set_num_threads(1); _generate({out!r})"


def build(code: str, extra_env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pair"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "ATEN_"))} | extra_env
        subprocess.run([sys.executable, "-c", code.format(out=str(out))], env=env, check=True, cwd=ROOT,
                       capture_output=True)
        import hashlib

        h = hashlib.sha256()
        for f in sorted(out.glob("*/model.safetensors")):
            h.update(f.read_bytes())
        info = json.loads((out / "tiny.json").read_text())
        return {"sha256": h.hexdigest(), "teacher_final_ce": info["teacher_final_ce"]}


def main() -> None:
    import torch

    rows = {name: {"pinned": build(PINNED, env), "unpinned": build(UNPINNED, env)} for name, env in SETTINGS.items()}
    for name, r in rows.items():
        print(f"{name:34s} pinned {r['pinned']['sha256'][:12]} CE {r['pinned']['teacher_final_ce']:.4f}   "
              f"unpinned {r['unpinned']['sha256'][:12]} CE {r['unpinned']['teacher_final_ce']:.4f}")
    pinned = {r["pinned"]["sha256"] for r in rows.values()}
    unpinned = {r["unpinned"]["sha256"] for r in rows.values()}
    result = {"date": datetime.date.today().isoformat(), "cpu": _cpu(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "settings": rows,
              "pinned_distinct_sha256": len(pinned), "unpinned_distinct_sha256": len(unpinned)}
    out = ROOT / "bench" / "results" / f"tiny_reproducibility-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"pinned: {len(pinned)} distinct pair(s); unpinned: {len(unpinned)}; wrote {out}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
