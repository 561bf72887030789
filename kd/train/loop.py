"""The KD training loop: AdamW, warm-up + cosine, accumulation, clipping, checkpoints, resume.

    result = train_student(cfg, teacher_dir, student_dir, alignment, packed, run_dir)

The loss of each batch is an objective's (kd/train/objectives.py: online teacher, teacher cache,
on-policy). Writes under `run_dir`: `checkpoints/step-NNNNNN/` (Hugging Face folder + trainer state as
safetensors + JSON, never pickle: kd/train/checkpoint.py; written to a temp folder then renamed, so a
crash never leaves half a checkpoint; it carries the initial loss, so any run can resume from it),
`metrics.jsonl` (one line per step) and `train.log`. A second call with the same `run_dir`
continues from the last checkpoint (or `train.resume_from`) and ends with the same weights
as an uninterrupted run: the data order is a pure function of (seed, step) and the
optimizer, scheduler and RNG states are restored.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from backends import get_backend
from kd.config import RunConfig
from kd.data import PackedData, train_batch
from kd.errors import ConfigError
from kd.hashing import hash_dir
from kd.results import TeacherCacheResult, TrainResult, VocabAlignment
from kd.rng import PROCESS_RNG_LOCK, RunRNG
from kd.train import loss_normalization
from kd.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state
from kd.train.objectives import (generation_row, make_objective, on_policy_objective, on_policy_summary,
                                 open_teacher_cache)

HELDOUT_FILE = "heldout.safetensors"
StepCallback = Callable[[dict], None]


def resolve_device(cfg: RunConfig) -> tuple[str, torch.dtype, bool]:
    """(device, weight dtype, use bf16 autocast) from train.device / train.dtype."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
    # bf16 autocast runs on CPU too (slower there, but CI exercises the bf16 code paths); auto = CUDA only
    autocast = cfg.train.dtype == "bfloat16" or (device == "cuda" and cfg.train.dtype == "auto")
    weights = torch.bfloat16 if cfg.train.param_dtype == "bfloat16" else torch.float32  # train.param_dtype
    return device, weights, autocast


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def seed_everything(seed: int) -> None:
    with PROCESS_RNG_LOCK:  # never while another run (a sweep trial's thread) has its own stream swapped in
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def training_digest(cfg: RunConfig) -> str:
    """What a checkpoint was trained for (objective, loop, data), recorded so a resume can say so."""
    from kd.hashing import digest_of

    parts = {"kd": cfg.kd.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
             "train": cfg.train.model_dump(mode="json", exclude={"resume_from", "log_every", "steps"})}
    return digest_of({k: json.dumps(v, sort_keys=True) for k, v in parts.items()})


def setup_log(path: Path, enabled: bool = True) -> logging.Logger:
    """The run's train.log (a fresh handler per call); `enabled=False` (non-zero ranks) writes nothing."""
    log = logging.getLogger(f"kdflow.train.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if enabled:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    else:
        log.addHandler(logging.NullHandler())
    return log


def trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop metric lines of steps the crashed attempt ran past its last checkpoint."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
    path.write_text("".join(line + "\n" for line in keep))


def fine_tuning_only(cfg: RunConfig) -> bool:
    """alpha = 1 off-policy (e.g. eval.control's run): the KD term weighs 0, so the teacher is never loaded."""
    return cfg.kd.alpha == 1.0 and not cfg.kd.on_policy.enabled


def train_student(
    cfg: RunConfig,
    teacher_dir: str | Path,
    student_dir: str | Path,
    alignment: VocabAlignment,
    packed: PackedData,
    run_dir: str | Path,
    *,
    on_step: StepCallback | None = None,
    teacher_cache: TeacherCacheResult | None = None,
    teacher_scorer=None,
) -> TrainResult:
    """Train the student for `cfg.train.steps` optimizer steps; resume if a checkpoint exists. `teacher_scorer`:
    the served teacher scoring on-policy samples (kd/teacher_server/on_policy.py; the caller owns the engine)."""
    t0 = time.perf_counter()
    run_dir, student_dir = Path(run_dir).expanduser().resolve(), Path(student_dir)  # results hold absolute paths
    run_dir.mkdir(parents=True, exist_ok=True)
    log = setup_log(run_dir / "train.log")
    metrics_path = run_dir / "metrics.jsonl"
    tc = cfg.train
    device, dtype, autocast = resolve_device(cfg)
    backend = get_backend("hf")

    resume = Path(tc.resume_from).expanduser().resolve() if tc.resume_from else latest_checkpoint(run_dir)
    # read (and check) the trainer state before loading anything: never a pickle, from any folder
    state = load_trainer_state(resume) if resume is not None else None
    digest = training_digest(cfg)
    seed_everything(tc.seed)
    trust = cfg.student.trust_remote_code
    student = backend.load(resume or student_dir, device=device, dtype=dtype, trust_remote_code=trust)
    # the frozen teacher is stored in the training dtype (bf16 under bf16 autocast): half the memory,
    # and no recast of its weights at every forward
    # offline (issue 13): a verified teacher cache bound to this data; the teacher is never loaded
    offline = open_teacher_cache(cfg, teacher_cache, packed)
    teacher = None if offline is not None or fine_tuning_only(cfg) else backend.load(
        teacher_dir, device=device, dtype=torch.bfloat16 if autocast else dtype,
        trust_remote_code=cfg.teacher.trust_remote_code)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    if tc.gradient_checkpointing:  # recompute layer activations in backward (issue 14 config)
        from kd.train.distributed.model import enable_activation_checkpointing

        enable_activation_checkpointing(student)
    # the run's own stream for what draws from torch's process generator (dropout): kd/rng.py
    run_rng = RunRNG(tc.seed, student, device=device, checkpointing=tc.gradient_checkpointing)
    optimizer = torch.optim.AdamW(student.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    objective = make_objective(cfg, student, teacher, offline, alignment, autocast=autocast, device=device,
                               model_dirs=(teacher_dir, student_dir), prepared_root=getattr(packed, "root", None))
    step_objective = on_policy_objective(cfg, objective, student, teacher, alignment, packed, student_dir,
                                         autocast=autocast, device=device, scorer=teacher_scorer)
    if teacher_scorer is not None and step_objective is not objective:
        info = teacher_scorer.describe()
        log.info("on-policy samples scored by %s at %s (served %s, prompt_logprobs %d%s)", info.get("engine"),
                 info.get("url"), info.get("served_model"), info["prompt_logprobs"], ", exact" if info["exact"] else "")
    log.info("teacher: %s", "not loaded: alpha = 1, fine-tuning only" if fine_tuning_only(cfg) else
             "online (loaded, runs every step)" if offline is None else f"offline cache {offline.folder} (top-k {offline.spec.k}, {offline.spec.encoding}); teacher not loaded")

    # A fixed probe batch measures initial and final loss on the same tokens (the smoke falsifier).
    probe = train_batch(packed.train, step=0, micro=0, batch_size=tc.batch_size, grad_accum=1, seed=tc.seed)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        run_rng.load_state_dict(state["rng"].get("run") or {"cpu": state["rng"]["torch"]})  # older: process state
        start_step = state["step"]
        trim_metrics(metrics_path, start_step)
        initial_loss = float(state["initial_loss"])  # the checkpoint carries it: resume works from any run
        tokens_before = int(state.get("tokens", 0))  # older checkpoints did not count: 0
        log.info("resumed from %s at step %d", resume, start_step)
        if state.get("config_digest") != digest:
            log.warning("resuming from %s, trained with other kd/data/train settings", resume)
    else:
        tokens_before = 0
        metrics_path.unlink(missing_ok=True)
        with torch.no_grad(), run_rng.scope():  # the student is in train mode: dropout draws
            initial_loss = float(objective(probe).loss)
        log.info("start: device=%s autocast_bf16=%s initial_loss=%.6f", device, autocast, initial_loss)

    # eval reads the held-out split of the same prepared set: nothing is tokenised twice
    heldout_path = Path(packed.root).resolve()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens_trained = 0  # what the loss saw in this attempt (labels != -100; on-policy: completion tokens)
    on_policy = step_objective is not objective

    def prepare(micro: int, batch):  # on-policy: the draw and the generation, before any backward
        step_objective.at(step, micro)
        return step_objective.prepare(batch)

    def forward(batch, normalizer: float):
        out = step_objective(batch, normalizer=normalizer)
        return out.loss, out.ce, out.kd

    ckpt = resume
    # a progress bar for people at a terminal; Prefect runs get the progress artifact instead
    bar = tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", disable=not sys.stderr.isatty())
    with bar, open(metrics_path, "a", encoding="utf-8") as metrics:
        for step in range(start_step, tc.steps):
            t_step = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            batches = [train_batch(packed.train, step=step, micro=micro, batch_size=tc.batch_size,
                                   grad_accum=tc.grad_accum, seed=tc.seed) for micro in range(tc.grad_accum)]
            # every trained token of the step weighs the same (kd/train/loss_normalization.py)
            with run_rng.scope():  # forwards and backwards (activation checkpointing replays the forward's draws)
                done_step = loss_normalization.run_step(batches, forward=forward, prepare=prepare if on_policy else None)
            tokens_trained += done_step.tokens
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), tc.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            dt = time.perf_counter() - t_step
            row = {"step": step + 1, "loss": done_step.loss, "ce": done_step.ce, "kd": done_step.kd, "lr": lr,
                   "grad_norm": grad_norm, "tokens": done_step.tokens, "tokens_per_s": done_step.tokens / dt,
                   "step_s": dt}
            if on_policy:
                row.update(generation_row(step_objective.take_stats(), dt))
            if not math.isfinite(row["loss"]):
                log.error("non-finite loss at step %d: %s", step + 1, row)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                log.info("step %d/%d loss=%.5f ce=%.5f kd=%.5f lr=%.3g grad_norm=%.4g tok/s=%.0f",
                         step + 1, tc.steps, row["loss"], row["ce"], row["kd"], lr, grad_norm, row["tokens_per_s"])
                if "gen_s" in row:
                    log.info("step %d generation: %d samples, %d tokens, %.1f tok/s, %.0f%% of the step", step + 1,
                             row["samples"], row["gen_tokens"], row["gen_tokens_per_s"], 100 * row["gen_share"])
            done = step + 1
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
                ckpt = save_checkpoint(run_dir, done, student, optimizer, scheduler, student_dir,
                                       initial_loss=initial_loss, config_digest=digest, run_rng=run_rng,
                                       tokens=tokens_before + tokens_trained)
                log.info("checkpoint %s", ckpt)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if on_step is not None:
                on_step({**row, "total_steps": tc.steps, "checkpoint": str(ckpt) if ckpt else None})

    student.eval()
    with torch.no_grad():
        final_loss = float(objective(probe).loss)
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    log.info("done: initial_loss=%.6f final_loss=%.6f wall_s=%.1f", initial_loss, final_loss, wall)
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    assert ckpt is not None
    return TrainResult(
        run_dir=str(run_dir), checkpoint_dir=str(ckpt), checkpoint_sha256=hash_dir(ckpt),
        metrics_path=str(metrics_path), log_path=str(run_dir / "train.log"), heldout_path=str(heldout_path),
        steps=tc.steps, resumed_from_step=start_step, tokens=tokens_before + tokens_trained,
        initial_loss=initial_loss, final_loss=final_loss, loss_normalization=loss_normalization.NORMALIZATION,
        tokens_per_s=tokens_trained / max(wall, 1e-9), wall_s=wall,
        peak_memory_bytes=int(peak), device=device, dtype="bfloat16-autocast" if autocast else "float32",
        teacher_cache=teacher_cache if offline is not None else None,
        on_policy=None if not on_policy else {**on_policy_summary(cfg, metrics_path), **(
            {"teacher_server": teacher_scorer.describe()} if teacher_scorer is not None else {})},
    )
