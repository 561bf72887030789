"""The two weak-student verdicts as a user meets them: the real `kdflow` CLI, its exit status and message.

    python bench/gate_messages.py            # both cases; writes bench/results/gate_messages-<date>.json

- worse than uniform: the SmolLM2 preset's pruned 10-layer student after `--steps` (default 2) steps at
  `--lr` 1e-5: held-out perplexity still above half the vocabulary size, yet not collapsed
  (F-DISTILL-UNIFORM-001 fails, F-DISTILL-COLLAPSE-001 passes; the preset's own 6 steps at 3e-4 already
  reach a perplexity of ~860, which passes);
- collapsed: a tiny student whose tied embedding/output matrix is zeroed, so every context gets the same
  uniform distribution, trained one step at lr 1e-9 (F-DISTILL-COLLAPSE-001 fails: entropy = log V).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def flat_student(out: Path) -> Path:
    """The tiny student with its (tied) embedding and output matrix zeroed: uniform predictions everywhere."""
    from safetensors.torch import load_file, save_file

    from kd.tiny import ensure_tiny

    _, student = ensure_tiny()
    shutil.copytree(student, out)
    weights = load_file(out / "model.safetensors")
    for name in weights:
        if "embed_tokens" in name or "lm_head" in name:
            weights[name].zero_()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def run_case(name: str, args: list[str], tmp: Path) -> dict:
    ev = tmp / f"evidence-{name}"
    cmd = [str(Path(sys.executable).parent / "kdflow"), "run", *args, "--evidence-dir", str(ev),
           "--set", f"work_dir={tmp / 'runs'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (run_dir,) = ev.iterdir()
    m = json.loads((run_dir / "manifest.json").read_text())
    last = [line for line in done.stderr.splitlines() if line.startswith("kdflow:")]
    return {"case": name, "command": " ".join(["kdflow", "run", *args]), "exit": done.returncode,
            "cli_message": last[-1] if last else None,
            "falsifiers": {f["id"]: {"verdict": f["verdict"], "observed": f["observed"]} for f in m["falsifiers"]},
            "student_after": {k: m["eval"]["student_after"][k] for k in ("perplexity", "entropy", "top_token_share")}
            if m.get("eval") else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", default="1e-5", help="small: the pruned student is still far from its teacher")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kdflow-gates-"))
    flat = flat_student(tmp / "flat-student")
    cases = [
        run_case("worse-than-uniform", ["configs/smollm2-135m-pruned.yaml", "--set", f"train.steps={args.steps}",
                                        "--set", f"train.lr={args.lr}", "--set", "train.warmup_steps=0"], tmp),
        run_case("collapsed", ["configs/smoke.yaml", "--set", f"student.repo={flat}", "--set", "train.steps=1",
                               "--set", "train.lr=1e-9", "--set", "train.warmup_steps=0"], tmp),
    ]
    for c in cases:
        print(json.dumps(c, indent=2)[:3000])
    out = args.out or REPO / "bench" / "results" / f"gate_messages-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps({"date": dt.date.today().isoformat(), "cases": cases}, indent=2) + "\n")


if __name__ == "__main__":
    main()
