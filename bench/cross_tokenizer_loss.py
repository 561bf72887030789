"""Benchmark: the cross-tokenizer losses vs the same-tokenizer fused loss, forward + backward, time and peak memory.

    .venv/bin/python bench/cross_tokenizer_loss.py                 # all variants, N = 512 student tokens
    .venv/bin/python bench/cross_tokenizer_loss.py --variant uld   # one measurement (child mode)

Inputs: real tokens and groups. The first N student tokens (Qwen2's tokenizer, 151,936 rows) of the bundled
English text (kd/corpus/english), aligned with SmolLM2's tokenizer (the teacher, 49,152 rows) by
kd.cross_tokenizer.align; random hidden states (H = 576, SmolLM2-135M's width) and output matrices, fp32, CPU.
Variants
    same        kd.train.losses.fused_linear_kd_loss, forward KL, the same student (Qwen2's rows, the same N
                tokens) with a teacher of the student's own vocabulary: what a same-family run computes
    uld         kd.cross_tokenizer.losses.cross_tokenizer_kd_loss, kind=uld      (sorts both vocabularies per group)
    hybrid      kind=hybrid (forward KL on byte-identical entries, ULD on the rest, GOLD's adaptive weight)
    projection  kind=projection, top_k=64 (the projection built before timing starts)
Method as bench/kd_loss.py: each variant in a fresh child; inputs built and one small warm-up call made, then
the baseline VmRSS; one timed forward + backward; peak = ru_maxrss - baseline (grads included: the student's
(V, H) weight grad is 350 MB for Qwen2's rows). Writes bench/results/cross_tokenizer_loss-n<N>-<date>.json
with the ratios to `same`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("same", "uld", "hybrid", "projection")
H = 576


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _inputs(n: int):
    import torch

    from kd.cross_tokenizer.align import TokenizerPair, align_text
    from kd.cross_tokenizer.vocab_files import load_tokenizer

    text = (ROOT / "kd" / "corpus" / "english" / "genesis-kjv.txt").read_text(encoding="utf-8")[:20_000]
    pair = TokenizerPair.of(load_tokenizer("smollm2"), load_tokenizer("qwen2"))
    doc = align_text(pair, text)
    g = int((doc.student_bounds <= n).sum()) - 1  # whole groups covering at most n student tokens
    sb, tb = doc.student_bounds[: g + 1], doc.teacher_bounds[: g + 1]
    gen = torch.Generator().manual_seed(0)

    def side(ids, vocab, grad):
        h = torch.randn(len(ids), H, generator=gen).requires_grad_(grad)
        w = (torch.randn(vocab, H, generator=gen) * 0.05).requires_grad_(grad)
        return h, w, torch.as_tensor(ids, dtype=torch.long)

    s = side(doc.student.ids[: sb[-1]], len(pair.student_bytes), True)
    t = side(doc.teacher.ids[: tb[-1]], len(pair.teacher_bytes), False)
    return pair, s, t, torch.as_tensor(sb).long(), torch.as_tensor(tb).long()


def child(variant: str, n: int) -> dict:
    import torch

    from kd.cross_tokenizer.losses import CrossTokenizerLoss, Side, cross_tokenizer_kd_loss
    from kd.cross_tokenizer.vocab_map import build_projection, exact_matches
    from kd.train.losses import fused_linear_kd_loss

    pair, (hs, ws, ys), (ht, wt, yt), sb, tb = _inputs(n)
    if variant == "same":  # the student's own vocabulary on the teacher's side too: what a same-family run costs
        ht2 = torch.randn(len(ys), H)
        wt2 = torch.randn_like(ws) * 0.05

        def run(k):
            return fused_linear_kd_loss(hs[:k], ws, ht2[:k], wt2, ys[:k], alpha=0.3, temperature=2.0,
                                        divergence="forward_kl", chunk_size=256).loss
        tokens, groups = len(ys), len(ys)
        params = (hs, ws)
    else:
        cfg = CrossTokenizerLoss(kind=variant, top_k=64)
        extra = {"vocab_map": exact_matches(pair.teacher_bytes, pair.student_bytes)}
        if variant == "projection":
            extra = {"projection": build_projection(pair)}

        def run(k):
            g = k if k < len(sb) - 1 else len(sb) - 1
            s = Side(hs[: sb[g]], ws, ys[: sb[g]], sb[: g + 1])
            t = Side(ht[: tb[g]], wt, yt[: tb[g]], tb[: g + 1])
            return cross_tokenizer_kd_loss(s, t, cfg, alpha=0.3, temperature=2.0, **extra).loss
        tokens, groups = len(ys), len(sb) - 1
        params = (hs, ws)
    run(4).backward()  # warm-up
    for p in params:
        p.grad = None
    base = _rss_mb()
    t0 = time.perf_counter()
    loss = run(10**9)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"variant": variant, "student_tokens": tokens, "groups": groups, "teacher_tokens": len(yt),
            "seconds": round(seconds, 2), "peak_mb": round(peak, 1), "loss": round(float(loss.detach()), 5),
            "load_average": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args.variant, args.n)))
        return 0
    rows = []
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--n", str(args.n)], capture_output=True,
                             text=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
            "variant": v, "error": out.stderr.strip()[-500:]}
        print(row, flush=True)
        rows.append(row)
    same = next(r for r in rows if r["variant"] == "same")
    ratios = {r["variant"]: {"time": round(r["seconds"] / same["seconds"], 2), "peak": round(r["peak_mb"] / max(same["peak_mb"], 1), 2)}
              for r in rows if "seconds" in r and r["variant"] != "same"}
    out = {"date": dt.date.today().isoformat(), "n": args.n, "hidden": H, "threads": os.cpu_count(),
           "teacher": "SmolLM2 tokenizer (49,152)", "student": "Qwen2 tokenizer (151,936)", "rows": rows,
           "ratio_to_same_tokenizer": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cross_tokenizer_loss-n{args.n}-{out['date']}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
