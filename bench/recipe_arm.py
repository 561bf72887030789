"""Issue 27 item 4: one arm of the recipe's search, the way bench/results/recipe_frontier-2026-12-05.md measured them.

    KDFLOW_HOME=.kdflow .venv/bin/python bench/recipe_arm.py NAME STUDENT_DIR [--train-layers 3,4,5] [KEY=VALUE ...]

Trains STUDENT_DIR (any folder `kdflow make-student` wrote) with kdflow's own loop (`kd.train.train_student`) and
the recipe's config (configs/smollm2-135m-recipe.yaml) plus the KEY=VALUE overrides, on CPU in fp32, then scores
bits per byte on the first 150 entries of the Devil's Dictionary (never trained on; `per_doc_bits` of
bench/recipe_explore.py) and a greedy answer to "What is the capital of France?". With --train-layers only those
student layers (and the final norm) are trained. One JSON line per arm is appended to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from recipe_explore import _load, answer, per_doc_bits  # noqa: E402

from kd.config import load_config  # noqa: E402
from kd.data import pack_dataset  # noqa: E402
from kd.gguf import ensure_hf_folder, packaged_smollm2  # noqa: E402
from kd.train.loop import train_student  # noqa: E402
from kd.vocab import align_vocab  # noqa: E402

BIERCE = ROOT / "kd/corpus/bierce/devils-dictionary.txt"


def train_only_layers(layers: set[int]) -> None:
    """Hand AdamW only the given decoder layers and the final norm; freeze the rest (the loop builds its own AdamW)."""
    adamw = torch.optim.AdamW

    def restricted(params, **kw):
        params = list(params)  # embedding, 9 tensors per Llama decoder layer, final norm
        chosen = [p for i, p in enumerate(params) if i == len(params) - 1 or (0 < i < len(params) - 1 and (i - 1) // 9 in layers)]
        keep = {id(p) for p in chosen}
        for p in params:
            p.requires_grad_(id(p) in keep)
        return adamw(chosen, **kw)

    torch.optim.AdamW = restricted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("student")
    ap.add_argument("overrides", nargs="*", help="recipe config overrides, e.g. train.steps=40 kd.temperature=2")
    ap.add_argument("--train-layers", default="", help="comma-separated student layers to train (default: all)")
    ap.add_argument("--bierce", type=int, default=150)
    ap.add_argument("--out", default=str(ROOT / "bench/results/recipe_frontier-2026-12-05.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.train_layers:
        train_only_layers({int(x) for x in args.train_layers.split(",")})
    teacher = str(ensure_hf_folder(packaged_smollm2(), "float32")[0])
    cfg = load_config(ROOT / "configs/smollm2-135m-recipe.yaml",
                      ["train.checkpoint_every=0", "train.device=cpu", "train.dtype=float32", *args.overrides])
    packed = pack_dataset(cfg.data, args.student, max_positions=8192, min_train_blocks=cfg.train.batch_size)
    lines = [x for x in BIERCE.read_text(encoding="utf-8").splitlines() if x.strip()][: args.bierce]
    teacher_bpb = per_doc_bits(_load(teacher), teacher, lines)["bpb"]
    t0 = time.time()
    res = train_student(cfg, teacher, args.student, align_vocab(teacher, args.student), packed,
                        Path(os.environ.get("KDFLOW_HOME", ROOT / ".kdflow")) / "recipe-arms" / args.name)
    wall = time.time() - t0
    model = _load(res.checkpoint_dir)
    bpb = per_doc_bits(model, teacher, lines)["bpb"]
    row = {"name": args.name, "student": args.student, "overrides": args.overrides, "train_layers": args.train_layers,
           "params": sum(p.numel() for p in model.parameters()), "tokens": res.tokens, "tokens_per_s": res.tokens_per_s,
           "train_wall_s": wall, "bierce_bpb": bpb, "teacher_bierce_bpb": teacher_bpb, "retention": teacher_bpb / bpb,
           "answer": answer(model, teacher, n=24)}
    print(json.dumps(row), flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
