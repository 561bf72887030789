"""KD training-step benchmark: tokens/s, peak memory and MFU of kdflow's real training step.

    python bench/train_step.py                       # Qwen2.5-1.5B -> 0.5B shapes on CUDA, bf16 autocast
    python bench/train_step.py --pair tiny --device cpu --steps 3   # a quick check that it runs anywhere

Models are randomly initialised from Qwen2.5 configs (no download): the step's cost depends on the
shapes, not the weights. One step = teacher forward (no grad) + student forward/backward through
the chunked fused-linear KD loss + AdamW update, exactly as `kd/train/loop.py` runs it.
MFU counts 6·N_student + 2·N_teacher FLOPs per token (attention FLOPs left out, as is usual)
against `--peak-tflops` (H100/H200 SXM dense bf16: 989). Writes `bench/results/train_step-<date>-<pair>.json`.

Distributed (kd/train/distributed: the same KDModule, DDP or FSDP2 wrapping the training task uses):

    python bench/train_step.py --distributed fsdp --nproc 8            # re-launches itself under torchrun
    python bench/train_step.py --compare 1,2,4,8 --distributed fsdp    # GPUs: scaling efficiency and MFU
    python bench/train_step.py --pair small --device cpu --compare 1,2 --distributed ddp --steps 5
                                                                       # CPU: 2-process overhead vs 1 process

`--batch` is per rank. `--compare` runs one process first (no torchrun, all cores), then torchrun with
each N > 1 ranks (cores split between them on CPU) and records tokens/s, step time, scaling efficiency
tokens/s(N) / (N × tokens/s(1)) and per-GPU MFU, side by side in one JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd.config import RunConfig  # noqa: E402
from kd.results import VocabAlignment  # noqa: E402
from kd.train.objectives import OnlineObjective  # noqa: E402

QWEN = {  # from the published config.json files
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "tiny-s": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1024),
    "tiny-t": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, vocab_size=1056),
}
QWEN.update({  # a CPU-sized pair where compute, not launch overhead, dominates a step
    "small-s": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True, vocab_size=8192),
    "small-t": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2, tie_word_embeddings=False, vocab_size=8192),
})
PAIRS = {"1.5b-0.5b": ("1.5b", "0.5b"), "7b-0.5b": ("7b", "0.5b"), "tiny": ("tiny-t", "tiny-s"),
         "small": ("small-t", "small-s")}


def build(name: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**QWEN[name], max_position_embeddings=32768)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="1.5b-0.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step and rank")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--distributed", choices=["none", "ddp", "fsdp"], default="none")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc-per-node)")
    ap.add_argument("--shard-teacher", action="store_true", help="fsdp: shard the teacher too")
    ap.add_argument("--compare", default=None, help="comma-separated rank counts, e.g. 1,2,4,8")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def measure(args) -> dict | None:
    """Time `args.steps` KD training steps on this process (one rank of a torchrun job, or alone)."""
    import contextlib

    import torch.distributed as dist

    from kd.train.distributed.model import KDModule, enable_activation_checkpointing, wrap
    from kd.train.distributed.runtime import process_group

    distributed = "RANK" in os.environ
    cuda = args.device.startswith("cuda")
    ctx = (process_group(timeout_s=900, device_pref="cuda" if cuda else "cpu") if distributed
           else contextlib.nullcontext(None))
    with ctx as env:
        device = env.device if env is not None else args.device
        rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
        t_name, s_name = PAIRS[args.pair]
        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
        teacher = build(t_name, device).eval().requires_grad_(False)
        student = build(s_name, device).train()
        if cuda:
            enable_activation_checkpointing(student)  # long sequences: activations dominate otherwise
        v_s = QWEN[s_name]["vocab_size"]
        alignment = VocabAlignment(verdict="teacher-padded" if QWEN[t_name]["vocab_size"] > v_s else "identical",
                                   teacher_rows=QWEN[t_name]["vocab_size"], student_rows=v_s,
                                   teacher_tokenizer_size=v_s, student_tokenizer_size=v_s, rows_kept=v_s,
                                   valid_vocab=v_s)
        cfg = RunConfig.model_validate({"teacher": {"repo": "bench/teacher"}, "student": {"repo": "bench/student"},
                                        "kd": {"chunk_size": args.chunk}, "data": {"seq_len": args.seq}})
        objective = OnlineObjective(cfg, student, teacher, alignment, autocast=cuda, device="cuda" if cuda else "cpu")
        if distributed:
            shard_t = args.distributed == "fsdp" and args.shard_teacher
            model = wrap(KDModule(objective, student, teacher, shard_teacher=shard_t),
                         mode=args.distributed if args.distributed != "none" else "ddp",
                         reduce_dtype=torch.float32, device=device, shard_teacher=shard_t)
            forward = lambda ids: model(ids)[0]  # noqa: E731
        else:
            forward = lambda ids: objective(ids).loss  # noqa: E731
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=cuda)
        g = torch.Generator(device="cpu").manual_seed(1 + rank)

        def step() -> float:
            ids = torch.randint(0, v_s, (args.batch, args.seq), generator=g)
            loss = forward(ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(2):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        sync()
        if distributed:
            dist.barrier()
        wall = time.perf_counter() - t0
        tokens = args.batch * (args.seq - 1) * args.steps * world
        tps = tokens / wall
        n_s, n_t = n_params(student), n_params(teacher)
        if distributed and args.distributed == "fsdp":  # sharded: count the global parameters
            n_s = sum(p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in student.parameters())
            n_t = n_params(teacher) if not args.shard_teacher else sum(
                p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in teacher.parameters())
        flops_per_token = 6 * n_s + 2 * n_t
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if rank != 0:
            return None
        return {
            "date": dt.date.today().isoformat(), "pair": args.pair,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "distributed": args.distributed if distributed else "none", "ranks": world,
            "threads_per_rank": torch.get_num_threads(), "batch_per_rank": args.batch, "global_batch": args.batch * world,
            "seq": args.seq, "chunk": args.chunk, "steps": args.steps,
            "student_params": n_s, "teacher_params": n_t, "tokens_per_s": tps, "step_s": wall / args.steps,
            "achieved_tflops": tps * flops_per_token / 1e12,
            "mfu_per_gpu": tps * flops_per_token / (world * args.peak_tflops * 1e12) if cuda else None,
            "peak_memory_gb_rank0": peak_gb, "loss_first_last": [losses[0], losses[-1]],
            "host_load_avg_1m": os.getloadavg()[0],  # other work on the host skews CPU timings
        }


def _launch(args, nproc: int, out: Path, torchrun: bool, threads: int | None = None) -> dict:
    """One measurement in a fresh process: alone (all cores) or as `nproc` torchrun ranks."""
    argv = [a for a in sys.argv[1:]]
    keep, skip = [], False
    for a in argv:  # drop --compare/--nproc/--out; they are set per launch
        if skip:
            skip = False
            continue
        if a in ("--compare", "--nproc", "--out"):
            skip = True
            continue
        if a.startswith(("--compare=", "--nproc=", "--out=")):
            continue
        keep.append(a)
    me = [str(Path(__file__).resolve()), *keep, "--out", str(out)]
    env = dict(os.environ)
    if not torchrun:
        cmd = [sys.executable, *me, "--distributed", "none"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *me]
    if threads and not args.device.startswith("cuda"):
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    date = dt.date.today().isoformat()
    if args.compare:
        counts = [int(x) for x in args.compare.split(",")]
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="kdflow-bench-"))
        # CPU: every rank gets the same threads (cores / most ranks), so a rank is the same unit of
        # compute in every run and efficiency measures what distributing costs
        threads = None if args.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // max(counts))
        runs = [_launch(args, n, tmp / f"n{n}.json", torchrun=n > 1, threads=threads) for n in counts]
        # counts may repeat (1,2,1,2: interleaved, so a busy host's drift hits both sides): compare means
        by: dict[int, dict] = {}
        for n in sorted(set(counts)):
            rs = [r for r in runs if r["ranks"] == n]
            by[n] = {"runs": len(rs), "tokens_per_s_mean": sum(r["tokens_per_s"] for r in rs) / len(rs),
                     "step_s_mean": sum(r["step_s"] for r in rs) / len(rs)}
        base = by[1]
        for n, b in by.items():
            b["scaling_efficiency"] = b["tokens_per_s_mean"] / (n * base["tokens_per_s_mean"])
            b["step_s_vs_1_process"] = b["step_s_mean"] / base["step_s_mean"]
        summary = {"date": date, "pair": args.pair, "device": runs[0]["device"], "distributed": args.distributed,
                   "note": "batch is per rank (weak scaling: N ranks process N x the tokens per step). On CPU every "
                           "rank has the same threads (cores / most ranks), so scaling_efficiency = "
                           "tokens/s(N) / (N x tokens/s(1)) is what the distribution costs (gloo collectives, "
                           "one teacher copy per rank, process start excluded); on GPUs it is the usual "
                           "weak-scaling efficiency",
                   "by_ranks": by, "runs": runs}
        print(json.dumps(summary, indent=2))
        out = args.out or Path(__file__).parent / "results" / f"train_step-{args.distributed}-{args.device.split(':')[0]}-{date}-{args.pair}.json"
        out.write_text(json.dumps(summary, indent=2) + "\n")
        return
    if (args.nproc > 1 or args.distributed != "none") and "RANK" not in os.environ:
        _launch(args, args.nproc, args.out or Path(__file__).parent / "results" /
                f"train_step-{date}-{args.pair}-{args.distributed}x{args.nproc}.json", torchrun=True)
        return
    row = measure(args)
    if row is None:
        return
    print(json.dumps(row, indent=2))
    out = args.out or Path(__file__).parent / "results" / f"train_step-{row['date']}-{args.pair}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
