"""On-policy distillation benchmark (issue 17) on the real SmolLM2 pair with chat prompts.

    python bench/on_policy.py                       # arms + TRL comparison, results to bench/results/
    python bench/on_policy.py --budget 60 --skip-trl

Part 1, arms under the same wall-clock budget (`--budget` seconds of training each, on this machine):
off-policy (kd.on_policy.fraction 0: the prepared chat turns, kd.divergence), on-policy (fraction 1:
the student samples completions of the conversations' prompts, reverse KL on its own tokens) and
mixed (fraction 0.5, GKD). Teacher: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32); student:
its 10-layer depth-pruned copy; data: kd/corpus/chat (configs/smollm2-135m-on-policy.yaml). Every arm
starts from the same student, runs kdflow's training step (kd.train's fused-linear objective inside
kd.on_policy's GKD objective, AdamW, clipping) at a constant learning rate until the budget is spent,
then is evaluated: held-out off-policy KL(teacher||student) on the held-out chat blocks (kd/evaluate/
heldout.py) and on-policy reverse KL / teacher NLL of its own T=1 samples of held-out prompts
(kd/evaluate/on_samples.py), before and after. Generation tokens/s and share of step time are recorded.

Part 2, the same on-policy step against TRL's GKDTrainer (trl.experimental.gkd, lmbda=1, beta=1 =
reverse KL, temperature 1), same models, same prompt token ids, max new tokens, batch size and learning
rate, each in its own subprocess: step time, generated tokens/s and peak RSS during the steps (sampled)
above the RSS with both models loaded. TRL twice: with its defaults (GKDConfig inherits SFTConfig's
gradient_checkpointing=True, and GKDTrainer then generates with use_cache=False) and with
gradient_checkpointing=False (KV cache on, as kdflow). TRL is bench-only, never a kdflow dependency; install it beside the venv:

    pip install --no-deps --target /tmp/bench-deps trl==1.16.0     # (the venv has accelerate, datasets)
    python bench/on_policy.py --trl-path /tmp/bench-deps

Writes bench/results/on_policy-<date>.json with the machine load (os.getloadavg) before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PRESET = ROOT / "configs" / "smollm2-135m-on-policy.yaml"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """The process's current RSS sampled every 20 ms in a thread: the peak while training runs (ru_maxrss
    would keep the high-water mark of loading and converting the models)."""

    def __init__(self):
        import threading

        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start_mb = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"rss_after_load_mb": self.start_mb, "peak_rss_mb": self.peak / 2**20,
                "peak_rss_above_load_mb": self.peak / 2**20 - self.start_mb}


def setup(overrides: list[str]):
    """(cfg, teacher_dir, student_dir, alignment, prepared set) for the preset (built once, cached)."""
    from kd.config import load_config
    from kd.data import model_max_positions, open_prepared, prepare_data
    from kd.hub import pull_model
    from kd.vocab import align_vocab

    cfg = load_config(PRESET, ["train.device=cpu", "train.dtype=float32", *overrides])
    teacher = pull_model(cfg.teacher, "teacher", dtype="float32")
    student = pull_model(cfg.student, "student", teacher=teacher, dtype="float32")
    prepared = prepare_data(cfg.data, student.local_dir, max_positions=model_max_positions(student.local_dir))
    return cfg, teacher.local_dir, student.local_dir, align_vocab(teacher.local_dir, student.local_dir), \
        open_prepared(prepared.path)


def sample_spec(cfg, student_dir, packed, prompts: int, max_new: int):
    from kd.evaluate.on_samples import SampleSpec
    from kd.train.on_policy import stop_ids_of

    stops = stop_ids_of(student_dir)
    return SampleSpec(stop_ids=frozenset(stops), pad_id=min(stops), fmt=packed.manifest["format"], prompts=prompts,
                      max_new_tokens=max_new, prompt_tokens=cfg.kd.on_policy.prompt_tokens,
                      max_prompt_tokens=cfg.kd.on_policy.max_prompt_tokens, seed=1234, batch_size=8)


def evaluate(model, teacher, packed, alignment, cfg, spec, prompts) -> dict:
    from kd.evaluate.heldout import evaluate_models
    from kd.evaluate.on_samples import evaluate_model_on_samples

    t0 = time.perf_counter()
    model.eval()
    (held,) = evaluate_models([model], teacher, packed.heldout, compare=[True], rows_kept=alignment.rows_kept,
                              valid_vocab=alignment.valid_vocab, batch_size=cfg.eval.batch_size,
                              chunk_size=cfg.kd.chunk_size, device="cpu", max_batches=cfg.eval.max_batches, backend="hf")
    own = evaluate_model_on_samples(model, teacher, prompts, alignment, spec, chunk_size=cfg.kd.chunk_size)
    model.train()
    return {"heldout_kl": held.kl_to_teacher, "heldout_loss": held.loss, "heldout_tokens": held.tokens,
            "own_sample_reverse_kl": own.reverse_kl, "own_sample_teacher_nll": own.teacher_nll,
            "own_sample_tokens": own.tokens, "own_samples_stopped": own.stopped, "eval_s": time.perf_counter() - t0}


def run_arm(name: str, fraction: float, cfg, teacher_dir, student_dir, alignment, packed, spec, prompts,
            budget_s: float, before: dict | None) -> dict:
    """kdflow's training step (kd.train objective, kd.on_policy GKD draw) until `budget_s` seconds are spent."""
    from backends import get_backend
    from kd.data import train_batch
    from kd.train.loop import seed_everything
    from kd.train.objectives import OnlineObjective, on_policy_objective

    arm_cfg = cfg.model_copy(deep=True)
    arm_cfg.kd.on_policy.fraction = fraction
    seed_everything(arm_cfg.train.seed)
    backend = get_backend("hf")
    student = backend.load(student_dir)
    teacher = backend.load(teacher_dir).eval().requires_grad_(False)
    if before is None:
        before = evaluate(student, teacher, packed, alignment, arm_cfg, spec, prompts)
    student.train()
    base = OnlineObjective(arm_cfg, student, teacher, alignment, False, "cpu")
    objective = on_policy_objective(arm_cfg, base, student, teacher, alignment, packed, student_dir,
                                    autocast=False, device="cpu")
    tc = arm_cfg.train
    opt = torch.optim.AdamW(student.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)  # constant lr: fair cut
    steps, t0, gen_s, gen_tokens, trained_tokens, kinds = 0, time.perf_counter(), 0.0, 0, 0, {}
    losses = []
    while time.perf_counter() - t0 < budget_s:
        batch = train_batch(packed.train, step=steps, micro=0, batch_size=tc.batch_size, grad_accum=1, seed=tc.seed)
        if objective is not base:
            objective.at(steps, 0)
        opt.zero_grad(set_to_none=True)
        out = objective(batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), tc.max_grad_norm)
        opt.step()
        steps += 1
        trained_tokens += out.tokens
        losses.append(float(out.loss.detach()))
        if objective is not base:
            st = objective.take_stats()
            gen_s, gen_tokens = gen_s + st["gen_s"], gen_tokens + st["gen_tokens"]
            for k in ("off_policy", "on_policy"):
                kinds[k] = kinds.get(k, 0) + st[k]
    train_s = time.perf_counter() - t0
    after = evaluate(student, teacher, packed, alignment, arm_cfg, spec, prompts)
    return {"arm": name, "fraction": fraction, "steps": steps, "train_s": train_s, "loss_tokens": trained_tokens,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "batches": kinds or {"off_policy": steps}, "gen_s": gen_s, "gen_tokens": gen_tokens,
            "gen_tokens_per_s": gen_tokens / gen_s if gen_s else None, "gen_share": gen_s / train_s,
            "before": before, "after": after}


# ------------------------------------------------------------------------------------------ kdflow vs TRL
def step_prompts(packed, cfg, n: int) -> list[list[int]]:
    from kd.train.on_policy import prompts_from_batch

    rows = list(range(min(n, len(packed.train))))
    return prompts_from_batch(packed.train.batch(rows), fmt=packed.manifest["format"],
                              prompt_tokens=cfg.kd.on_policy.prompt_tokens,
                              max_prompt_tokens=cfg.kd.on_policy.max_prompt_tokens, rng=random.Random(0))


def worker(kind: str, args) -> dict:
    """One process: load both models, run `args.steps` on-policy steps on the same prompts, report."""
    cfg, teacher_dir, student_dir, alignment, packed = setup(args.set)
    B, steps, max_new = args.batch, args.steps, args.max_new_tokens
    prompts = step_prompts(packed, cfg, B * steps)
    torch.manual_seed(0)
    from backends import get_backend
    from kd.train.on_policy import stop_ids_of

    stops = sorted(stop_ids_of(student_dir))
    backend = get_backend("hf")
    student = backend.load(student_dir)
    teacher = backend.load(teacher_dir).eval().requires_grad_(False)
    import gc

    gc.collect()
    mem = RssPeak()
    times, gen_times, gen_tokens = [], [], []
    if kind == "kdflow":
        from kd.train.objectives import OnlineObjective, on_policy_objective

        c = cfg.model_copy(deep=True)
        c.kd.on_policy.fraction, c.kd.on_policy.max_new_tokens, c.train.batch_size = 1.0, max_new, B
        obj = on_policy_objective(c, OnlineObjective(c, student, teacher, alignment, False, "cpu"), student, teacher,
                                  alignment, packed, student_dir, autocast=False, device="cpu")
        opt = torch.optim.AdamW(student.parameters(), lr=c.train.lr)
        student.train()
        for i in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            samples = obj.generator.generate(student, prompts[i * B:(i + 1) * B], obj.settings, seed=i)
            out = obj.generated(samples.batch())
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            times.append(time.perf_counter() - t0)
            gen_times.append(samples.seconds)
            gen_tokens.append(samples.new_tokens)
    else:  # "trl" / "trl-nogc"
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import datasets
        from transformers import AutoTokenizer, TrainerCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        tok = AutoTokenizer.from_pretrained(student_dir)
        pad = min(stops)
        tok.pad_token_id = pad

        def collate(rows):
            width = max(len(r["prompt_ids"]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # left padding, as TRL's DataCollatorForChatML
                ids[i, width - len(r["prompt_ids"]):] = torch.tensor(r["prompt_ids"])
                mask[i, width - len(r["prompt_ids"]):] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100),
                    "prompts": ids, "prompt_attention_mask": mask}

        real = GKDTrainer.generate_on_policy_outputs

        def timed(model, inputs, generation_config):
            t0 = time.perf_counter()
            out = real(model, inputs, generation_config)
            gen_times.append(time.perf_counter() - t0)
            gen_tokens.append(int((out[2] != -100).sum()))
            return out

        GKDTrainer.generate_on_policy_outputs = staticmethod(timed)

        class Clock(TrainerCallback):
            def on_step_begin(self, a, s, c, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, a, s, c, **kw):
                times.append(time.perf_counter() - self.t0)

        student.generation_config.eos_token_id = stops
        gkd = GKDConfig(output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=B, max_steps=steps,
                        lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=max_new, learning_rate=cfg.train.lr,
                        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1,
                        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
                        dataloader_num_workers=0, disable_dropout=True, max_length=None,
                        # "trl": TRL's defaults (SFTConfig turns gradient checkpointing on, and GKDTrainer then
                        # generates without a KV cache); "trl-nogc": off, as kdflow's default and its KV cache
                        gradient_checkpointing=kind == "trl")
        class GKD(GKDTrainer):
            """The collator has prompts only (no reference completions), so the Trainer's num_items_in_batch
            (labels != -100 of the collated batch) is 0; drop it: TRL's own `batchmean` then averages over the
            generated tokens, the normalisation kdflow uses."""

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return super().compute_loss(model, inputs, return_outputs, None)

        trainer = GKD(model=student, teacher_model=teacher, args=gkd, data_collator=collate,
                             train_dataset=datasets.Dataset.from_dict({"prompt_ids": prompts}),
                             processing_class=tok, callbacks=[Clock()])
        trainer.train()
    skip = 1  # the first step pays one-off costs (allocator, kernels): timed steps start at the second
    t, g, n = sum(times[skip:]), sum(gen_times[skip:]), sum(gen_tokens[skip:])
    return {"impl": kind, "steps_timed": len(times) - skip, "step_s_mean": t / max(1, len(times) - skip),
            "gen_tokens": n, "gen_tokens_per_step_s": n / t, "gen_tokens_per_gen_s": n / g if g else None,
            "gen_share": g / t if t else None, **mem.done(), "ru_maxrss_mb": rss_mb(),
            **({"gradient_checkpointing": kind == "trl"} if kind != "kdflow" else {})}


def compare(args) -> dict:
    out = {}
    for kind in ("kdflow", "trl", "trl-nogc"):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in [str(ROOT), args.trl_path if kind != "kdflow" else "", os.environ.get("PYTHONPATH", "")] if p))
        cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--batch", str(args.batch),
               "--max-new-tokens", str(args.max_new_tokens), "--tmp", args.tmp, *sum((["--set", s] for s in args.set), [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            out[kind] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            continue
        out[kind] = json.loads(line[-1][7:])
    k = out.get("kdflow", {})
    for name in ("trl", "trl-nogc"):
        t = out.get(name, {})
        if "error" not in k and "error" not in t and t:
            out[f"ratios_kdflow_over_{name}"] = {
                "gen_tokens_per_step_s": k["gen_tokens_per_step_s"] / t["gen_tokens_per_step_s"],
                "gen_tokens_per_gen_s": k["gen_tokens_per_gen_s"] / t["gen_tokens_per_gen_s"],
                "step_s_mean": k["step_s_mean"] / t["step_s_mean"],
                "peak_rss": k["peak_rss_mb"] / t["peak_rss_mb"],
                "peak_rss_above_load": k["peak_rss_above_load_mb"] / t["peak_rss_above_load_mb"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=75.0, help="training seconds per arm")
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--eval-max-new-tokens", type=int, default=32)
    ap.add_argument("--arms", default="off,on,mixed")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-arms", action="store_true")
    ap.add_argument("--trl-path", default="/tmp/bench-deps")
    ap.add_argument("--steps", type=int, default=6, help="TRL comparison: on-policy steps per implementation")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], help="config override for the preset")
    ap.add_argument("--worker", choices=["kdflow", "trl", "trl-nogc"])
    ap.add_argument("--tmp", default="/tmp/kdflow-bench-on-policy")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads()))
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return 0
    day = dt.date.today().isoformat()
    result = {"bench": "on_policy", "date": day, "preset": str(PRESET.relative_to(ROOT)), "overrides": args.set,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "loadavg_start": os.getloadavg(), "torch": torch.__version__},
              "budget_s": args.budget}
    cfg, teacher_dir, student_dir, alignment, packed = setup(args.set)
    spec = sample_spec(cfg, student_dir, packed, args.eval_prompts, args.eval_max_new_tokens)
    from kd.evaluate.on_samples import heldout_prompts

    prompts = heldout_prompts(packed.heldout, spec)
    result["eval"] = {"heldout_blocks": min(len(packed.heldout), cfg.eval.batch_size * (cfg.eval.max_batches or 10**9)),
                      "own_sample_prompts": len(prompts), "own_sample_max_new_tokens": spec.max_new_tokens,
                      "train_batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                      "on_policy": cfg.kd.on_policy.model_dump(mode="json"), "off_policy_divergence": cfg.kd.divergence}
    if not args.skip_arms:
        fractions = {"off": 0.0, "on": 1.0, "mixed": 0.5}
        arms, before = [], None
        for name in args.arms.split(","):
            arm = run_arm(name, fractions[name], cfg, teacher_dir, student_dir, alignment, packed, spec, prompts,
                          args.budget, before)
            before = arm["before"]
            arms.append(arm)
            print(json.dumps(arm), flush=True)
        result["arms"] = arms
        result["winner"] = {
            "heldout_kl": min(arms, key=lambda a: a["after"]["heldout_kl"])["arm"],
            "own_sample_reverse_kl": min(arms, key=lambda a: a["after"]["own_sample_reverse_kl"])["arm"]}
    if not args.skip_trl:
        result["vs_trl"] = {"steps": args.steps, "batch": args.batch, "max_new_tokens": args.max_new_tokens,
                            "trl": "trl==1.16.0 trl.experimental.gkd.GKDTrainer lmbda=1 beta=1 temperature=1; trl = "
                            "its defaults (gradient checkpointing on, so generation without KV cache), trl-nogc = "
                            "gradient_checkpointing=False",
                            **compare(args)}
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out or ROOT / "bench" / "results" / f"on_policy-{day}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
