"""A chat run's loss curve under the old and the new loss normalization, side by side (issue 31).

    python bench/loss_normalization.py                    # tiny pair, bundled chat corpus, ~1-2 min on 2 cores
    python bench/loss_normalization.py --steps 60 --grad-accum 4 --batch-size 2

The tiny teacher/student (kd/tiny.py) with a ChatML template, the bundled chat corpus
(kd/corpus/chat/genesis-chat.jsonl) with the assistant-only mask, so blocks train uneven numbers of
tokens. Two runs with the same seed, data order and hyper-parameters:
  after   kdflow as it is: every trained token of a step weighs 1/N, N = the step's trained tokens
          (kd/train/loss_normalization.py)
  before  the old rule, reimplemented here and swapped in for kd.train.loss_normalization.run_step (the one
          place the rule lives): each micro-batch's token mean / grad_accum, logged as the mean of the
          micro-batch means
For the old run the per-token loss of each step (sum of its tokens' losses / N) is recorded next to
what it logged, so the curves compare like with like; both runs' final held-out loss (per token, the
eval's own metric) and the relative gradient difference of the two rules on step 1 are recorded too.
Writes bench/results/loss_normalization-<date>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kd.train.loss_normalization as norm  # noqa: E402
from kd.train.loss_normalization import StepLoss, trained_tokens  # noqa: E402

CHATML = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def old_run_step(batches, *, forward, prepare=None, world_size=1, reduce_sum=None, sync=None, record=None):
    """The rule before issue 31 (single process): backward(micro-batch token mean / grad_accum); logged loss =
    mean of the micro-batch means. `record` gets the step's true per-token loss alongside."""
    ready = [prepare(m, b) for m, b in enumerate(batches)] if prepare is not None else list(batches)
    g = len(ready)
    logged, ce, kd, token_sum, n = 0.0, 0.0, 0.0, 0.0, 0
    for b in ready:
        loss, c, k = forward(b, None)[:3]  # normalizer None: the micro-batch's token mean
        (loss / g).backward()
        m = trained_tokens(b)
        logged, ce, kd = logged + float(loss.detach()) / g, ce + float(c) / g, kd + float(k) / g
        token_sum, n = token_sum + float(loss.detach()) * m, n + m
    if record is not None:
        record.append({"logged_loss": logged, "per_token_loss": token_sum / max(n, 1), "tokens": n,
                       "micro_tokens": [trained_tokens(b) for b in ready]})
    return StepLoss(loss=logged, ce=ce, kd=kd, tokens=n)


def setup(work: Path, seq_len: int):
    from kd.config import load_config
    from kd.data import open_prepared, prepare_data
    from kd.tiny import ensure_tiny

    pair = []
    for name, src in zip(("teacher", "student"), ensure_tiny()):
        shutil.copytree(src, work / name, dirs_exist_ok=True)
        (work / name / "chat_template.jinja").write_text(CHATML)
        pair.append(work / name)
    data = [f"data.source={ROOT / 'kd/corpus/chat/genesis-chat.jsonl'}", "data.format=chat", "data.train_on=assistant",
            f"data.seq_len={seq_len}", "data.bad_records=skip", f"data.prepared_dir={work / 'prepared'}"]
    r = prepare_data(load_config(str(ROOT / "configs/smoke.yaml"), data).data, pair[1])
    return pair, data, open_prepared(r.path), r.counts


def heldout_loss(ckpt: str, teacher: Path, student: Path, prepared) -> float:
    from backends import get_backend
    from kd.evaluate import evaluate_model
    from kd.vocab import align_vocab

    al = align_vocab(teacher, student)
    m = evaluate_model(get_backend("hf").load(ckpt), None, prepared.heldout, rows_kept=al.rows_kept,
                       valid_vocab=al.valid_vocab, batch_size=8)
    return float(m.loss)


def step1_gradient_gap(cfg, teacher, student, prepared) -> float:
    """max |g_old - g_new| / max |g_new| over the student's parameters, step 1 (float64)."""
    from backends import get_backend
    from kd.data import train_batch
    from kd.train.objectives import OnlineObjective
    from kd.vocab import align_vocab

    be, al = get_backend("hf"), align_vocab(teacher, student)
    s = be.load(student, dtype=torch.float64)
    t = be.load(teacher, dtype=torch.float64).requires_grad_(False)
    obj = OnlineObjective(cfg, s, t, al, False, "cpu")
    tc = cfg.train
    batches = [train_batch(prepared.train, step=0, micro=m, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                           seed=tc.seed) for m in range(tc.grad_accum)]
    grads = []
    for rule in (old_run_step, norm.run_step):
        s.zero_grad(set_to_none=True)
        rule(batches, forward=lambda b, n: (lambda o: (o.loss, o.ce, o.kd))(obj(b, normalizer=n)))
        grads.append([p.grad.clone() for p in s.parameters()])
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*grads))


def plot(out_png: Path, steps, before_logged, before_token, after) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, before_logged, label="before: logged (mean of micro-batch means)", color="tab:orange", alpha=0.6)
    ax.plot(steps, before_token, label="before: per-token loss of the same step", color="tab:red")
    ax.plot(steps, after, label="after: per-token, global step (logged)", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.set_title("tiny pair, chat data (assistant-only mask): old vs new normalization")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default=str(ROOT / "bench/results" / f"loss_normalization-{dt.date.today()}.json"))
    args = ap.parse_args()

    from kd.config import load_config
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    work = Path(tempfile.mkdtemp(prefix="kdflow-lossnorm-"))
    (teacher, student), data, prepared, counts = setup(work, args.seq_len)
    cfg = load_config(str(ROOT / "configs/smoke.yaml"), data + [
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}",
        f"train.lr={args.lr}", "train.warmup_steps=4", "train.checkpoint_every=0", "train.device=cpu",
        "train.dtype=float32", "kd.alpha=0.3", "kd.temperature=2.0"])
    al = align_vocab(teacher, student)
    runs, record = {}, []
    for name in ("before", "after"):
        patch = (contextlib.nullcontext() if name == "after" else _swap(norm, "run_step",
                 lambda *a, **k: old_run_step(*a, **k, record=record)))
        with patch:
            res = train_student(cfg, teacher, student, al, prepared, work / name)
        rows = [json.loads(x) for x in Path(res.metrics_path).read_text().splitlines()]
        runs[name] = {"rows": rows, "result": res,
                      "heldout_loss": heldout_loss(res.checkpoint_dir, teacher, student, prepared)}
    gap = step1_gradient_gap(cfg, teacher, student, prepared)

    steps = [r["step"] for r in runs["after"]["rows"]]
    before_logged = [r["loss"] for r in runs["before"]["rows"]]
    before_token = [r["per_token_loss"] for r in record]
    after = [r["loss"] for r in runs["after"]["rows"]]
    spread = [max(r["micro_tokens"]) / max(1, min(r["micro_tokens"])) for r in record]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "what": "tiny pair on the bundled chat corpus (assistant-only mask): loss per step before (mean of "
                "micro-batch means) and after (per-token over the global step) the issue-31 normalization",
        "date": str(dt.date.today()), "host_cpus": os.cpu_count(), "torch": torch.__version__,
        "config": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                   "seq_len": args.seq_len, "lr": args.lr, "alpha": 0.3, "temperature": 2.0, "seed": 0},
        "data": {k: counts[k] for k in ("train_blocks", "train_tokens", "train_target_tokens")},
        "micro_batch_trained_tokens_max_over_min": {"mean": sum(spread) / len(spread), "max": max(spread)},
        "step1_gradient_relative_gap_old_vs_new_float64": gap,
        "before": {"logged_loss": before_logged, "per_token_loss": before_token,
                   "final_heldout_loss_per_token": runs["before"]["heldout_loss"],
                   "trained_tokens": sum(r["tokens"] for r in record)},
        "after": {"logged_loss": after, "final_heldout_loss_per_token": runs["after"]["heldout_loss"],
                  "trained_tokens": runs["after"]["result"].tokens,
                  "loss_normalization": runs["after"]["result"].loss_normalization},
        "max_abs_gap_logged_vs_per_token_before": max(abs(a - b) for a, b in zip(before_logged, before_token)),
        "steps": steps,
    }
    out.write_text(json.dumps(summary, indent=1) + "\n")
    plot(out.with_suffix(".png"), steps, before_logged, before_token, after)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("before", "after", "steps")}, indent=1))
    for name in ("before", "after"):
        print(name, "held-out loss", summary[name]["final_heldout_loss_per_token"], "first/last logged",
              summary[name]["logged_loss"][0], summary[name]["logged_loss"][-1])
    shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _swap(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


if __name__ == "__main__":
    main()
