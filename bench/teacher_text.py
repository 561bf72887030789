"""Regenerate kd/corpus/teacher/smollm2-text.jsonl: text the bundled teacher wrote, the recipe's training data.

    KDFLOW_HOME=.kdflow .venv/bin/python bench/teacher_text.py [--rounds 6] [--out FILE]

Why: the recipe (configs/smollm2-135m-recipe.yaml, issue 27) must keep >= 90 % of the teacher's bits per byte on
text from a source it never trained on. Trained on one narrow source, a 20-of-30-layer student's out-of-domain
retention stalls near 0.87 whatever the source (Genesis 0.874, the teacher's chat answers 0.872; 40 steps each,
bench/results/recipe_text-2026-12-05.md). The teacher's own *unconditional* samples (generation started from
its BOS token, no prompt) are as broad as what it learned: stories, essays, biographies, advice. Distilling on
them gets further (0.883 at the same 40 steps). The records are
- `rounds` x 48 unconditional samples (temperature 1.0, top-p 0.95, at most 256 new tokens, seeded), keeping
  those of >= 20 words whose share of repeated word trigrams is <= 0.5 (the ship check's measure: a few
  samples are loops such as "*\\n*\\n*"), and
- the 320 conversations of kd/corpus/chat/smollm2-answers.jsonl rendered with the teacher's chat template as
  plain text, so the student also sees the chat format it is asked in,
shuffled with seed 0, one {"text": ...} record a line. Sampling is seeded but runs through the CPU's matmul
kernels, so another CPU may write other (equally valid) samples. About 6 minutes on 2 cores (~170 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("KDFLOW_HOME", str(ROOT / ".kdflow"))

import torch  # noqa: E402

torch.set_num_threads(2)

BATCH = 48
MIN_WORDS = 20
MAX_REPETITION = 0.5


def unconditional_samples(folder: Path, rounds: int, seed: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    texts, new_tokens, t0 = [], 0, time.perf_counter()
    for r in range(rounds):
        ids = torch.full((BATCH, 1), tok.bos_token_id)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_p=0.95, max_new_tokens=256, pad_token_id=tok.eos_token_id)
        for row in gen[:, 1:]:
            new_tokens += int((row != tok.eos_token_id).sum())
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
        print(f"round {r + 1}/{rounds}: {new_tokens} tokens, {new_tokens / (time.perf_counter() - t0):.0f} tok/s",
              flush=True)
    return texts


def main() -> None:
    from transformers import AutoTokenizer

    from kd.evaluate.ship import repetition, words
    from kd.gguf import ensure_hf_folder, packaged_smollm2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answers", default=str(ROOT / "kd/corpus/chat/smollm2-answers.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "kd/corpus/teacher/smollm2-text.jsonl"))
    args = ap.parse_args()

    folder, _ = ensure_hf_folder(packaged_smollm2(), dtype="float32")
    samples = unconditional_samples(folder, args.rounds, args.seed)
    kept = [t for t in samples if len(words(t)) >= MIN_WORDS and repetition(t, 3) <= MAX_REPETITION]
    tok = AutoTokenizer.from_pretrained(folder)
    chats = [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False)
             for line in Path(args.answers).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"text": t} for t in kept] + [{"text": c} for c in chats]
    random.Random(0).shuffle(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records ({len(kept)} of {len(samples)} samples kept, {len(chats)} conversations) "
          f"to {args.out}")


if __name__ == "__main__":
    main()
