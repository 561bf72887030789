"""Issue 27: how often does a recipe student loop, under plain greedy and under a repetition penalty?

    KDFLOW_HOME=.kdflow .venv/bin/python bench/recipe_loops.py [--penalty 1.2] CHECKPOINT [CHECKPOINT ...]

Completes 8 chat prompts (the recipe's 4 sample prompts and 4 more) and the first 24 held-out prompts of the
recipe's data (16 tokens each, cut as `eval.heldout_sample_prompts` cuts them) greedily, 48 new tokens, with
transformers' `repetition_penalty` (1.0: plain greedy), by the teacher and each CHECKPOINT, and counts the
completions that F-SHIP-REPETITION-001 calls a loop (seq-rep-3 > max(0.5, the teacher's on that prompt)).
The ship verdict reads 12 of these prompts; this reads 32, to see the rate rather than one draw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KDFLOW_HOME", str(ROOT / ".kdflow"))

import torch  # noqa: E402

torch.set_num_threads(2)

from kd.config import load_config  # noqa: E402
from kd.data import pack_dataset  # noqa: E402
from kd.evaluate.on_samples import SampleSpec, heldout_prompts  # noqa: E402
from kd.evaluate.ship import repetition  # noqa: E402
from kd.gguf import ensure_hf_folder, packaged_smollm2  # noqa: E402
from kd.samples import generate_samples  # noqa: E402

CHAT = ["What is the capital of France?", "Write one sentence about the sea.", "Give me two tips for sleeping well.",
        "What is a verb?", "Name three colours of the rainbow.", "Why do leaves fall in autumn?",
        "How many legs does a spider have?", "Write a haiku about snow."]
HELDOUT = 24


def completions(folder: str, tokenizer_dir: str, prompts: list[list[int]], penalty: float) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    samples = generate_samples({"m": model}, tokenizer_dir, CHAT, max_new_tokens=48, valid_vocab=model.config.vocab_size,
                               heldout_prompt_ids=prompts, repetition_penalty=penalty)
    return [s.completions["m"] for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--penalty", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="append one JSON line per checkpoint here")
    args = ap.parse_args()
    teacher = str(ensure_hf_folder(packaged_smollm2(), "float32")[0])
    cfg = load_config(ROOT / "configs/smollm2-135m-recipe.yaml", ["train.device=cpu"])
    heldout = pack_dataset(cfg.data, teacher, max_positions=8192, min_train_blocks=cfg.train.batch_size).heldout
    prompts = heldout_prompts(heldout, SampleSpec(stop_ids=frozenset(), pad_id=0, fmt="text", prompts=HELDOUT,
                                                  prompt_tokens=cfg.kd.on_policy.prompt_tokens, seed=cfg.train.seed))
    bars = [max(0.5, repetition(t, 3)) for t in completions(teacher, teacher, prompts, args.penalty)]
    print(f"penalty {args.penalty:g}: teacher loops (seq-rep-3 > 0.5) on {sum(b > 0.5 for b in bars)} of {len(bars)}")
    for ck in args.checkpoints:
        texts = completions(ck, teacher, prompts, args.penalty)
        loops = [i for i, (t, bar) in enumerate(zip(texts, bars)) if repetition(t, 3) > bar]
        row = {"checkpoint": ck, "penalty": args.penalty, "prompts": len(texts), "loops": len(loops),
               "loops_chat": sum(i < len(CHAT) for i in loops), "chat_answers": dict(zip(CHAT, texts))}
        print(f"{ck}: {len(loops)} of {len(texts)} loop ({row['loops_chat']} of {len(CHAT)} chat prompts)")
        for prompt, text in row["chat_answers"].items():
            print(f"  {prompt} -> {text[:120]!r}")
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
