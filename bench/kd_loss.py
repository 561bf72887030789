"""Benchmark of the KD loss, forward + backward: naive full logits vs kdflow's fused loss vs Liger-Kernel.

    .venv/bin/python bench/kd_loss.py                      # CPU fp32, all variants, N in 512 1024 2048
    .venv/bin/python bench/kd_loss.py --device cuda --dtype bf16
    .venv/bin/python bench/kd_loss.py --variant kdflow --n 2048 --chunk 256   # one measurement (child mode)

Shapes: H=896 (student and, by default, teacher), V=151,936 (Qwen2.5-0.5B's output rows), all labels valid,
divergence = generalized JSD beta=0.5 (what Liger's LigerFusedLinearJSDLoss computes), alpha=0.5, T=2.
Liger is given weight_hard_loss=alpha, weight_soft_loss=(1-alpha)*T^2, so all three compute the same number
(the table shows the loss values as a cross-check).

Variants
    naive   student logits (N, V) by autograd, teacher logits under no_grad, `kd_loss_reference`, backward.
    kdflow  `kd.train.losses.fused_linear_kd_loss` (chunk --chunk, default 256).
    liger   `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss` (plain PyTorch chunked loss, compiled=False on
            CPU, chunk --chunk). Not a project dependency: if it cannot be imported, the parent installs the
            pinned wheel with `pip install --no-deps --target ~/.cache/kdflow/bench-liger liger-kernel==0.8.5`
            and the child puts that folder on sys.path. If that fails too, the row says `unavailable` + reason.

Method. Each measurement runs in a fresh child process, so allocator state and peaks do not leak between
variants. The child allocates the inputs, runs one small warm-up call of the same variant (thread pools,
kernels), drops its grads, then reads the baseline RSS (VmRSS from /proc/self/status). It then times one
forward + backward (wall clock, perf_counter) and reports the peak RSS over that baseline two ways:
`peak_mb` = ru_maxrss (the kernel's exact high-water mark) minus baseline — valid because the measured step's
peak is far above anything before it (checked: `peak_mb_sampled` from a thread reading VmRSS every 2 ms).
The grads (w.grad is a (V, H) fp32 matrix, 545 MB) are part of every variant's peak. On CUDA, memory is
torch.cuda.max_memory_allocated() minus the allocated bytes at baseline, time is taken after synchronize.

Writes bench/results/kd_loss-<YYYY-MM-DD>.json (CPU; `kd_loss-cuda-bf16-<date>.json` on CUDA) with the raw
rows and the ratios the issue asks about: kdflow/naive memory at the largest N, kdflow/liger memory,
kdflow/naive time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LIGER_DIR = Path(os.environ.get("KDFLOW_BENCH_CACHE", Path.home() / ".cache" / "kdflow")) / "bench-liger"
LIGER_PIN = "liger-kernel==0.8.5"
VARIANTS = ("naive", "kdflow", "liger")
H, V = 896, 151_936
ALPHA, TEMP, BETA = 0.5, 2.0, 0.5


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _RssSampler(threading.Thread):
    """Peak VmRSS seen by polling; a cross-check for ru_maxrss."""

    def __init__(self, period_s: float = 0.002):
        super().__init__(daemon=True)
        self.period_s, self.peak, self._halt = period_s, 0.0, threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.period_s)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return max(self.peak, _rss_mb())


def _import_liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        sys.path.insert(0, str(LIGER_DIR))
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    return LigerFusedLinearJSDLoss


def ensure_liger() -> str | None:
    """Returns None when Liger imports (installing the pinned wheel --no-deps if needed), else the reason."""
    probe = [sys.executable, __file__, "--probe-liger"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(LIGER_DIR), LIGER_PIN]
    inst = subprocess.run(cmd, capture_output=True, text=True)
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return f"pip install --no-deps {LIGER_PIN} failed: {(inst.stderr or done.stderr).strip().splitlines()[-1:]}"


def _make_inputs(n: int, hidden: int, vocab: int, teacher_hidden: int, device: str, dtype):
    import torch

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h = rnd(n, hidden).requires_grad_()
    w = rnd(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    ht = rnd(n, teacher_hidden)
    wt = rnd(vocab, teacher_hidden, scale=teacher_hidden**-0.5)
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    return h, w, ht, wt, y


def _step_fn(variant: str, chunk: int, divergence: str, device: str = "cpu"):
    """Returns f(h, w, ht, wt, y) -> loss tensor (forward only; the caller runs backward)."""
    import torch

    from kd.train.losses import fused_linear_kd_loss, kd_loss_reference

    kw = dict(alpha=ALPHA, temperature=TEMP, divergence=divergence, beta=BETA)
    if variant == "naive":

        def f(h, w, ht, wt, y):
            z = h @ w.t()
            with torch.no_grad():
                t = ht @ wt.t()
            return kd_loss_reference(z, t, y, **kw).loss

    elif variant == "kdflow":

        def f(h, w, ht, wt, y):
            return fused_linear_kd_loss(h, w, ht, wt, y, chunk_size=chunk, **kw).loss

    elif variant == "liger":
        if divergence != "jsd":
            raise ValueError("liger only computes the JSD family: run it with --divergence jsd")
        loss_mod = _import_liger()(
            weight_hard_loss=ALPHA, weight_soft_loss=(1 - ALPHA) * TEMP**2, beta=BETA,
            temperature=TEMP, compiled=device == "cuda", chunk_size=chunk,  # its default on GPU; CPU: plain eager
        )

        def f(h, w, ht, wt, y):
            return loss_mod(h, w, ht, wt, y)

    else:
        raise ValueError(f"unknown variant {variant!r}")
    return f


def child(args) -> dict:
    """Measure one variant at one N in this (fresh) process."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = args.device == "cuda"
    row = {"variant": args.variant, "n": args.n, "chunk": args.chunk, "device": args.device, "dtype": args.dtype,
           "divergence": args.divergence, "threads": torch.get_num_threads()}
    f = _step_fn(args.variant, args.chunk, args.divergence, args.device)
    h, w, ht, wt, y = _make_inputs(args.n, args.hidden, args.vocab, args.teacher_hidden or args.hidden, args.device, dtype)
    # Warm-up on the same code path: thread pools, kernels, lazy imports. CPU: small, to keep the run short;
    # CUDA: full size, so torch.compile (Liger) and cuBLAS heuristics are not inside the timed step.
    warm = args.n if cuda else min(args.n, 64)
    f(h[:warm], w, ht[:warm], wt, y[:warm]).backward()
    h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_mb()
    sampler = _RssSampler()
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = f(h, w, ht, wt, y)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    row["time_s"] = time.perf_counter() - t0
    row["cpu_s"] = time.process_time() - c0  # less sensitive than wall time to other load on a shared machine
    sampled = sampler.stop()
    row["loss"] = float(loss.detach())
    row["grad_w_norm"] = float(w.grad.float().norm())
    if cuda:
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
        row["peak_mb_sampled"] = sampled - base_rss
    row["baseline_mb"] = base_rss
    return row


def _run_child(variant, n, args) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--n", str(n), "--chunk", str(args.chunk),
           "--device", args.device, "--dtype", args.dtype, "--divergence", args.divergence,
           "--teacher-hidden", str(args.teacher_hidden or args.hidden), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"variant": variant, "n": n, "status": "failed", "reason": p.stderr.strip().splitlines()[-1:]}
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "status": "ok"}


def _summarise(runs: list[dict]) -> list[dict]:
    """One row per (variant, N): fastest wall and CPU time over the repeats, largest peak memory."""
    rows = []
    for key in dict.fromkeys((r["variant"], r["n"]) for r in runs):
        mine = [r for r in runs if (r["variant"], r["n"]) == key]
        ok = [r for r in mine if r["status"] == "ok"]
        if not ok:
            rows.append({k: v for k, v in mine[-1].items() if k != "rep"})
            continue
        row = {k: v for k, v in ok[0].items() if k != "rep"}
        row.update(time_s=min(r["time_s"] for r in ok), cpu_s=min(r["cpu_s"] for r in ok),
                   peak_mb=max(r["peak_mb"] for r in ok), times_s=[r["time_s"] for r in ok], repeats=len(ok))
        rows.append(row)
    return rows


def _ratios(rows: list[dict]) -> dict:
    ok = {(r["variant"], r["n"]): r for r in rows if r.get("status") == "ok"}
    out = {}
    for n in sorted({r["n"] for r in rows}):
        k, nv, lg = ok.get(("kdflow", n)), ok.get(("naive", n)), ok.get(("liger", n))
        d = {}
        if k and nv:
            d["kdflow_over_naive_memory"] = k["peak_mb"] / nv["peak_mb"]
            d["kdflow_over_naive_time"] = k["time_s"] / nv["time_s"]
            d["kdflow_over_naive_cpu_time"] = k["cpu_s"] / nv["cpu_s"]
        if k and lg:
            d["kdflow_over_liger_memory"] = k["peak_mb"] / lg["peak_mb"]
            d["kdflow_over_liger_time"] = k["time_s"] / lg["time_s"]
        out[str(n)] = d
    return out


def parent(args) -> None:
    ns = args.ns
    liger_reason = None
    if "liger" in args.variants:
        liger_reason = ensure_liger()
    runs = []  # every child measurement; variants interleave so background load hits them alike
    for rep in range(args.repeat):
        for n in ns:
            for v in args.variants:
                if v == "liger" and liger_reason:
                    r = {"variant": v, "n": n, "status": "unavailable", "reason": liger_reason}
                else:
                    r = _run_child(v, n, args)
                runs.append({**r, "rep": rep})
                print(f"  [{rep}] {v:7s} N={n:5d} " + (
                    f"{r['time_s']:7.2f} s (cpu {r['cpu_s']:6.1f} s) {r['peak_mb']:9.0f} MB"
                    if r["status"] == "ok" else f"{r['status']}: {r.get('reason')}"), flush=True)
    rows = _summarise(runs)
    ratios = _ratios(rows)
    print(f"\nKD loss fwd+bwd, {args.device} {args.dtype}, H={args.hidden} V={args.vocab} divergence={args.divergence} chunk={args.chunk}")
    print(f"{'variant':8s} {'N':>5s} {'time s':>8s} {'cpu s':>8s} {'peak MB':>9s} {'loss':>10s}")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['variant']:8s} {r['n']:5d} {r['time_s']:8.2f} {r['cpu_s']:8.1f} {r['peak_mb']:9.0f} {r['loss']:10.5f}")
        else:
            print(f"{r['variant']:8s} {r['n']:5d} {r['status']}: {r.get('reason')}")
    for n, d in ratios.items():
        print(f"N={n}: " + ", ".join(f"{k}={v:.3f}" for k, v in d.items()))
    import torch

    top = str(max(ns))
    targets = ratios.get(top, {})
    report = {
        "date": dt.date.today().isoformat(),
        "device": args.device, "dtype": args.dtype, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "shape": {"H": args.hidden, "V": args.vocab, "teacher_hidden": args.teacher_hidden or args.hidden, "N": ns},
        "loss": {"divergence": args.divergence, "beta": BETA, "alpha": ALPHA, "temperature": TEMP},
        "chunk": args.chunk, "liger": LIGER_PIN if not liger_reason else f"unavailable: {liger_reason}",
        "method": "fresh process per measurement; peak = ru_maxrss - VmRSS after inputs+warm-up (CPU), "
                  "max_memory_allocated - allocated (CUDA); time = one fwd+bwd wall clock (and process CPU "
                  "time), fastest of --repeat runs, peak = largest",
        "rows": rows,
        "runs": runs,
        "ratios": ratios,
        "targets": {
            "memory_le_1/8_naive": targets.get("kdflow_over_naive_memory", 9) <= 1 / 8,
            "memory_below_liger": targets.get("kdflow_over_liger_memory", 9) < 1,
            "time_le_1.05_naive": targets.get("kdflow_over_naive_time", 9) <= 1.05,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "" if args.device == "cpu" else f"{args.device}-{args.dtype}-"
    out = RESULTS / f"kd_loss-{tag}{report['date']}.json"
    if args.out:
        out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"targets at N={top}: {report['targets']}\nwrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, help="child mode: measure one variant at --n")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--ns", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="run every (variant, N) this many times; keep the fastest")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--divergence", default="jsd", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--hidden", type=int, default=H, help="student hidden size H")
    ap.add_argument("--vocab", type=int, default=V, help="vocab rows V")
    ap.add_argument("--teacher-hidden", type=int, default=0, help="teacher hidden size (default: --hidden)")
    ap.add_argument("--out", help="result path (default bench/results/kd_loss-<date>.json)")
    ap.add_argument("--probe-liger", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_liger:
        _import_liger()
        return
    if args.variant:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(args)))
    else:
        parent(args)


if __name__ == "__main__":
    main()
