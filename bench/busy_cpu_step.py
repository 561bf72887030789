"""kdflow's KD training step vs a naive Hugging Face KD step on a busy CPU (issue 21.5).

    python bench/busy_cpu_step.py                    # SmolLM2-135M shapes, two CPU burners beside it
    python bench/busy_cpu_step.py --burners 0 --repeats 1 --steps 2

Each arm runs in a fresh interpreter started the way a user starts kdflow (no OMP_WAIT_POLICY in its
environment), while `--burners` processes spin (`while True: pass`) beside it, as on a shared runner:
- `kdflow`: kdflow's step (kd.train's objective: chunked fused-linear KD loss, no (N, V) logits) after
  `import kd`, which sets the OpenMP wait policy before torch loads (the product's default);
- `naive`: the textbook HF KD step in the same environment: full student and teacher logits, CE +
  T²·KL(teacher‖student) with F.kl_div over the whole vocab;
- `kdflow-old-default`: kdflow's step with torch loaded before kdflow, i.e. libgomp's own default,
  which is what users got before kd/__init__.py set PASSIVE.
Arms are interleaved `--repeats` times (a busy host's drift hits every arm alike); the ratio of medians
is reported. Models are random-initialised llama configs with SmolLM2-135M's shapes (hidden 576,
vocab 49,152; teacher 30 layers, student 10): a step's cost depends on the shapes, not the weights.
Writes bench/results/busy_cpu_step-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)

CHILD = r"""
import json, os, sys, time
arm, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shape = json.loads(sys.argv[5])
if arm == "kdflow-old-default":
    import torch  # loaded before kdflow: libgomp reads its own default wait policy
policy_at_torch_load = os.environ.get("OMP_WAIT_POLICY")  # what libgomp saw, when torch is loaded first
sys.path.insert(0, sys.argv[6])
import kd  # the product's entry: sets OMP_WAIT_POLICY=PASSIVE unless the user set it (before torch loads)
import torch
if arm != "kdflow-old-default":
    policy_at_torch_load = os.environ.get("OMP_WAIT_POLICY")
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from kd.config import RunConfig
from kd.results import VocabAlignment
from kd.train.objectives import OnlineObjective

torch.manual_seed(0)
layers = json.loads(sys.argv[7])
teacher = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers[0])).eval().requires_grad_(False)
student = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers[1])).train()
V = shape["vocab_size"]
T, alpha = 1.0, 0.5
cfg = RunConfig.model_validate({"teacher": {"repo": "bench/t"}, "student": {"repo": "bench/s"},
                                "kd": {"alpha": alpha, "temperature": T, "chunk_size": 256}, "data": {"seq_len": seq}})
align = VocabAlignment(verdict="identical", teacher_rows=V, student_rows=V, teacher_tokenizer_size=V,
                       student_tokenizer_size=V, rows_kept=V, valid_vocab=V)
objective = OnlineObjective(cfg, student, teacher, align, autocast=False, device="cpu")
opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
g = torch.Generator().manual_seed(1)

def naive_loss(ids):
    s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
    labels = ids[:, 1:]
    ce = F.cross_entropy(s_logits.reshape(-1, V), labels.reshape(-1))
    kl = F.kl_div(F.log_softmax(s_logits / T, -1).reshape(-1, V), F.log_softmax(t_logits / T, -1).reshape(-1, V),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * T * T * kl

def step():
    ids = torch.randint(0, V, (batch, seq), generator=g)
    loss = naive_loss(ids) if arm == "naive" else objective(ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    step()
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"arm": arm, "omp_wait_policy_at_torch_load": policy_at_torch_load,
                              "threads": torch.get_num_threads(), "step_s": wall / steps,
                              "tokens_per_s": batch * (seq - 1) * steps / wall}))
"""


def run_arm(arm: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", CHILD, arm, str(args.batch), str(args.seq), str(args.steps),
                          json.dumps(SMOLLM2), str(REPO), json.dumps([args.teacher_layers, args.student_layers])],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.rsplit("RESULT ", 1)[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burners", type=int, default=2, help="CPU-bound processes spinning beside the bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256, help="4 x 255 = 1,020 next-token positions per step")
    ap.add_argument("--arms", default="kdflow,naive,kdflow-old-default")
    ap.add_argument("--teacher-layers", type=int, default=30, help="SmolLM2-135M has 30")
    ap.add_argument("--student-layers", type=int, default=10, help="the pruned preset keeps 10")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    runs, load = [], []
    try:
        for r in range(args.repeats):
            for arm in args.arms.split(","):
                load.append(os.getloadavg()[0])
                row = run_arm(arm, args) | {"repeat": r}
                print(json.dumps(row), flush=True)
                runs.append(row)
    finally:
        for b in burners:
            b.kill()
    med = {arm: statistics.median(x["tokens_per_s"] for x in runs if x["arm"] == arm) for arm in args.arms.split(",")}
    summary = {
        "date": dt.date.today().isoformat(), "cpu_cores": os.cpu_count(), "burners": args.burners,
        "host_load_avg_1m": {"min": min(load), "max": max(load)},
        "shape": {**SMOLLM2, "teacher_layers": args.teacher_layers, "student_layers": args.student_layers, "tokens_per_step": args.batch * (args.seq - 1)},
        "median_tokens_per_s": med,
        "kdflow_vs_naive": med.get("kdflow", 0) / med["naive"] if "naive" in med else None,
        "old_default_vs_naive": (med["kdflow-old-default"] / med["naive"]
                                 if "naive" in med and "kdflow-old-default" in med else None),
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    out = args.out or REPO / "bench" / "results" / f"busy_cpu_step-{summary['date']}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
