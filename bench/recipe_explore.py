"""Issue 27 item 4, exploration: how far does a pruned SmolLM2-135M student get on 2 CPU cores, with KD vs fine-tuning?

    KDFLOW_HOME=.kdflow .venv/bin/python bench/recipe_explore.py --keep 20 --steps 40 [--out FILE]

For each pruned student (layers chosen by `measured`, taken from bench/results/layer_choice-2026-12-04.json so
the minutes of choosing are not repeated; built once into $KDFLOW_HOME/recipe/): bits/byte of the teacher, the
student before training, after KD (kd.alpha, kd.temperature, forward KL, online teacher) and after fine-tuning
only (alpha = 1, same data/steps/lr/seed), on
  * OOD: the first N entries (one per line) of kd/corpus/bierce/devils-dictionary.txt (never trained on);
  * in-domain: Genesis chapters 41-45 (held out: training reads chapters 1-40 only).
bits/byte = summed NLL in bits / UTF-8 bytes, each document scored after an EOS token (kd.layer_choice.bits_per_byte,
the measure of the layer-choice bench). Retention = teacher bpb / student bpb. KD - FT on OOD: a paired bootstrap
over documents of the difference of pooled bits/byte. Also a greedy chat-templated answer to a sample prompt.
Training goes through kd.train.train_student with a RunConfig from load_config(configs/smollm2-135m-pruned.yaml, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("KDFLOW_HOME", str(ROOT / ".kdflow"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

from kd.bundled import source_path  # noqa: E402
from kd.gguf import ensure_hf_folder, packaged_smollm2  # noqa: E402
from kd.prune import make_student  # noqa: E402

HOME = Path(os.environ["KDFLOW_HOME"]) / "recipe"
PROMPT = "What is the capital of France?"


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def per_doc_bits(model, tokenizer_dir, lines):
    from kd.data.sources import eos_id, load_tokenizer

    tok, eos = load_tokenizer(tokenizer_dir), eos_id(tokenizer_dir)
    bits, nbytes, ntok = [], [], 0
    t0 = time.perf_counter()
    for line in lines:
        ids = [eos] + tok.encode(line, add_special_tokens=False).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        bits.append(float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")) / math.log(2))
        nbytes.append(len(line.encode("utf-8")))
        ntok += len(ids) - 1
    return {"bits": bits, "bytes": nbytes, "bpb": sum(bits) / sum(nbytes), "tokens": ntok,
            "eval_s": round(time.perf_counter() - t0, 1)}


def answer(model, folder, prompt=PROMPT, n=20):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def paired_bootstrap(a, b, n=2000, seed=0):
    """a, b: per-doc (bits, bytes) of two models on the same docs; CI of bpb(a) - bpb(b)."""
    ba, bb, by = (np.asarray(x, dtype=float) for x in (a["bits"], b["bits"], a["bytes"]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(by), size=(n, len(by)))
    d = ba[idx].sum(1) / by[idx].sum(1) - bb[idx].sum(1) / by[idx].sum(1)
    return {"diff": float(ba.sum() / by.sum() - bb.sum() / by.sum()),
            "ci95": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--bierce", type=int, default=150)
    ap.add_argument("--arms", default="kd,ft")
    ap.add_argument("--out", default=str(ROOT / "bench/results/recipe_explore-2026-12-04.json"))
    args = ap.parse_args()

    from kd.config import load_config
    from kd.data import pack_dataset
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    result.update({"what": "issue 27.4 exploration: pruned SmolLM2-135M-Instruct students on 2 CPU cores, KD vs FT",
                   "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                   "host_cpus": os.cpu_count()})
    teacher_dir, _ = ensure_hf_folder(packaged_smollm2(), "float32")
    genesis = source_path("bundled:english").joinpath("genesis-kjv.txt").read_text(encoding="utf-8").splitlines()
    held_in = genesis[40:45]
    bierce_all = [x for x in (ROOT / "kd/corpus/bierce/devils-dictionary.txt").read_text(encoding="utf-8").splitlines()
                  if x.strip()]
    held_ood = bierce_all[: args.bierce]
    HOME.mkdir(parents=True, exist_ok=True)
    train_txt = HOME / "data" / "genesis-1-40.txt"
    train_txt.parent.mkdir(parents=True, exist_ok=True)
    train_txt.write_text("\n".join(genesis[:40]) + "\n", encoding="utf-8")

    evals = result.setdefault("evals", {})

    def ev(name, folder, model=None):
        if name in evals:
            return evals[name]
        m = model or _load(folder)
        row = {"params": sum(p.numel() for p in m.parameters()),
               "layers": m.config.num_hidden_layers}
        for key, lines in (("ood_bierce", held_ood), ("in_genesis_41_45", held_in)):
            r = per_doc_bits(m, folder, lines)
            row[key] = r
        t0 = time.perf_counter()
        row["answer"] = answer(m, folder)
        row["answer_s"] = round(time.perf_counter() - t0, 1)
        evals[name] = row
        print(name, json.dumps({k: (v["bpb"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
        save()
        return row

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        slim = json.loads(json.dumps(result))
        out.write_text(json.dumps(slim, indent=1) + "\n")

    ev("teacher", teacher_dir)
    lc = json.loads((ROOT / "bench/results/layer_choice-2026-12-04.json").read_text())
    layers = next(r["layers"] for r in lc["runs"] if r["keep"] == args.keep and r["arm"] == "measured")
    sdir = HOME / f"student-{args.keep}-measured"
    if not (sdir / "config.json").exists():
        make_student(teacher_dir, sdir, layers=layers)
    ev(f"before-{args.keep}", sdir)

    overrides = [f"data.source={train_txt}", f"data.seq_len={args.seq_len}", "data.heldout_fraction=0.05",
                 f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
                 f"train.warmup_steps={max(1, args.steps // 10)}", "train.checkpoint_every=0", "train.device=cpu",
                 "train.dtype=float32", f"kd.temperature={args.temperature}", "kd.divergence=forward_kl",
                 "train.seed=0"]
    al = align_vocab(teacher_dir, sdir)
    tag = f"{args.keep}L-s{args.steps}-b{args.batch_size}-L{args.seq_len}-lr{args.lr}"
    for arm in args.arms.split(","):
        alpha = 1.0 if arm == "ft" else args.alpha
        name = f"{arm}-{tag}" + ("" if arm == "ft" else f"-a{alpha}-T{args.temperature}")
        if name in evals:
            continue
        cfg = load_config(str(ROOT / "configs/smollm2-135m-pruned.yaml"), overrides + [f"kd.alpha={alpha}"])
        packed = pack_dataset(cfg.data, sdir, max_positions=8192, min_train_blocks=args.batch_size)
        res = train_student(cfg, teacher_dir, sdir, al, packed, HOME / "runs" / name)
        row = ev(name, res.checkpoint_dir)
        row["train"] = {"arm": arm, "alpha": alpha, "temperature": args.temperature, "steps": args.steps,
                        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                        "tokens": res.tokens, "tokens_per_s": res.tokens_per_s, "wall_s": res.wall_s,
                        "initial_loss": res.initial_loss, "final_loss": res.final_loss,
                        "train_blocks": len(packed.train) if hasattr(packed.train, "__len__") else None}
        print(name, json.dumps(row["train"]), flush=True)
        save()

    # summary
    t = evals["teacher"]
    summary = {}
    for name, row in evals.items():
        summary[name] = {"params": row["params"], "layers": row["layers"],
                         "ood_bpb": round(row["ood_bierce"]["bpb"], 4),
                         "ood_retention": round(t["ood_bierce"]["bpb"] / row["ood_bierce"]["bpb"], 4),
                         "in_bpb": round(row["in_genesis_41_45"]["bpb"], 4),
                         "in_retention": round(t["in_genesis_41_45"]["bpb"] / row["in_genesis_41_45"]["bpb"], 4),
                         "answer": row["answer"], **({k: row["train"][k] for k in ("tokens", "tokens_per_s", "wall_s")}
                                                     if "train" in row else {})}
    pairs = {}
    for name in evals:
        if name.startswith("kd-"):
            ft = "ft-" + name[3:].rsplit("-a", 1)[0]
            if ft in evals:
                pairs[f"{name} minus {ft}"] = {
                    "ood": paired_bootstrap(evals[name]["ood_bierce"], evals[ft]["ood_bierce"]),
                    "in": paired_bootstrap(evals[name]["in_genesis_41_45"], evals[ft]["in_genesis_41_45"])}
    result["summary"], result["kd_minus_ft_bpb"] = summary, pairs
    save()
    print(json.dumps({"summary": summary, "kd_minus_ft": pairs}, indent=1))


if __name__ == "__main__":
    main()
