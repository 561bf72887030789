"""The distributed training loop: the same steps as kd/train/loop.py, on `world_size` ranks.

    result = train_distributed(cfg, teacher_dir, student_dir, alignment, packed, run_dir, env, emit=print)

Batch semantics (as in TRL / accelerate): `train.batch_size` is the micro-batch of ONE rank, so the
global batch is batch_size × world_size × grad_accum. The data order is kd.data.train_batch's: the
single-process micro-batch of `batch_size × world_size` sequences for (step, micro), of which rank r
takes the r-th slice. So a run on W ranks sees exactly the sequences, in the same order, of a
single-process run with batch_size × W, and (fp32) ends with the same weights up to reduction order.

The loss is kd/train/loss_normalization.py's rule, the one kd/train/loop.py uses: every trained token of the step
weighs 1/N, N = the trained tokens of the whole step (every micro-batch of every rank, counted and
all-reduced before the first backward); each rank backpropagates W x its token sum / N (DDP and FSDP
average gradients over W), so the gradient and the logged loss are those of one process on the same
global batch, however it is split. Rank 0 writes metrics.jsonl, train.log and the checkpoints' HF folder.

Randomness: the data order needs none; every rank reseeds torch at each step from (seed, step, rank),
so a resume at any world size replays the same random draws (the KD models use no dropout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from backends import get_backend
from kd.config import RunConfig
from kd.data import train_batch
from kd.train.distributed import checkpoint as ckpt_io
from kd.train.distributed.model import KDModule, enable_activation_checkpointing, no_sync, student_of, wrap
from kd.train.distributed.runtime import DistEnv, all_reduce_sum
from kd.errors import ConfigError
from kd.hashing import hash_dir
from kd.train.loss_normalization import NORMALIZATION, run_step
from kd.results import TrainResult, VocabAlignment
from kd.train.loop import HELDOUT_FILE, lr_lambda, seed_everything, setup_log, trim_metrics
from kd.train.objectives import (generation_row, make_objective, on_policy_objective, on_policy_summary,
                                 open_teacher_cache)

Emit = Callable[[str, dict], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def uses_bf16_autocast(cfg: RunConfig, device_type: str) -> bool:
    """train.dtype: bfloat16 -> autocast anywhere; auto -> on CUDA only; float32 -> never."""
    return cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and device_type == "cuda")


def rank_batch(train, *, step: int, micro: int, per_rank: int, grad_accum: int, seed: int, env: DistEnv):
    """Rank r's share of the single-process micro-batch of per_rank × world_size sequences
    (a `Batch` of ids / labels / position ids, or bare ids, whichever kd.data.train_batch gives)."""
    full = train_batch(train, step=step, micro=micro, batch_size=per_rank * env.world_size,
                       grad_accum=grad_accum, seed=seed)
    mine = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    if isinstance(full, torch.Tensor):
        return full[mine]
    # rows are sliced with the tensors; the split's name (a str) is kept whole
    return type(full)(**{f.name: getattr(full, f.name)[mine] if hasattr(getattr(full, f.name), "shape")
                         else getattr(full, f.name) for f in dataclasses.fields(full)})


def _grad_norm(total) -> float:
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def train_distributed(
    cfg: RunConfig, teacher_dir: str | Path, student_dir: str | Path, alignment: VocabAlignment,
    packed, run_dir: str | Path, env: DistEnv, *, emit: Emit | None = None,
    after_checkpoint: Callable[[int], None] | None = None, teacher_cache=None,
) -> TrainResult | None:
    """Train on every rank (call from each); rank 0 returns the TrainResult, the others None.
    `teacher_cache` (kd.teacher_mode=offline): every rank reads the cached teacher top-k of its own rows
    of the batch; the teacher is never loaded."""
    t0 = time.perf_counter()
    tc, W = cfg.train, env.world_size
    mode = tc.distributed if tc.distributed != "none" else "ddp"
    run_dir, student_dir = Path(run_dir), Path(student_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    log = setup_log(run_dir / "train.log", env.is_main)
    say = emit if (emit is not None and env.is_main) else (lambda kind, row: None)
    metrics_path = run_dir / "metrics.jsonl"
    device_type = "cuda" if env.device.startswith("cuda") else "cpu"
    autocast = uses_bf16_autocast(cfg, device_type)
    global_batch = tc.batch_size * W * tc.grad_accum

    resume = Path(tc.resume_from).expanduser() if tc.resume_from else ckpt_io.latest(run_dir)
    if resume is not None and not ckpt_io.is_checkpoint(resume):
        raise ConfigError(f"train.resume_from: {resume} is not a kdflow distributed checkpoint "
                          f"(no {ckpt_io.STATE_FILE} and {ckpt_io.DCP_DIR}/.metadata)")
    state = ckpt_io.read_state(resume) if resume is not None else None
    if state is not None and state["global_batch"] != global_batch:
        raise ConfigError(
            f"train.batch_size: the checkpoint {resume} was trained with a global batch of {state['global_batch']} "
            f"sequences; batch_size {tc.batch_size} × {W} ranks × grad_accum {tc.grad_accum} = {global_batch}. "
            "Keep the global batch when resuming at another world size.")

    seed_everything(tc.seed)
    backend = get_backend("hf")
    dtype = DTYPES[tc.param_dtype]
    student = backend.load(student_dir, device=env.device, dtype=dtype, trust_remote_code=cfg.student.trust_remote_code)
    offline = None
    if getattr(cfg.kd, "teacher_mode", "online") == "offline":  # issue 13's cache, read by rank
        offline = open_teacher_cache(cfg, teacher_cache, packed)
    teacher = None if offline is not None else backend.load(
        teacher_dir, device=env.device, dtype=dtype, trust_remote_code=cfg.teacher.trust_remote_code)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()
    if tc.gradient_checkpointing:
        enable_activation_checkpointing(student)
    shard_teacher = mode == "fsdp" and tc.teacher_sharding == "shard" and teacher is not None
    objective = make_objective(cfg, student, teacher, offline, alignment, autocast=autocast, device=device_type,
                               model_dirs=(teacher_dir, student_dir), prepared_root=getattr(packed, "root", None))
    # kd.on_policy: GKD's objective; each rank samples its own rows' prompts (the seed includes the rank);
    # under FSDP2 generation gathers every layer once and steps the ranks together (synced)
    objective = on_policy_objective(cfg, objective, student, teacher, alignment, packed, student_dir,
                                    autocast=autocast, device=device_type, rank=env.rank, synced=mode == "fsdp")
    policy = objective if cfg.kd.on_policy.enabled else None
    model = wrap(KDModule(objective, student, teacher, shard_teacher=shard_teacher), mode=mode,
                 reduce_dtype=DTYPES[tc.reduce_dtype], device=env.device, shard_teacher=shard_teacher)
    student = student_of(model)
    say("log", {"msg": f"models loaded and wrapped ({mode}, teacher "
                       f"{'offline cache' if teacher is None else 'sharded' if shard_teacher else 'replicated'})"})
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    def batch(step: int, micro: int, accum: int) -> torch.Tensor:
        return rank_batch(packed.train, step=step, micro=micro, per_rank=tc.batch_size, grad_accum=accum,
                          seed=tc.seed, env=env)

    def probe_loss() -> float:
        if policy is not None:
            policy.force_off_policy = True  # the probe is the prepared batch, as in kd/train/loop.py
        with torch.no_grad():
            loss, _, _, tokens = model(batch(0, 0, 1))
        if policy is not None:
            policy.force_off_policy = False
        if hasattr(model, "reshard"):
            model.reshard()  # FSDP2: a no-grad forward leaves the root unit gathered
        s = all_reduce_sum([float(loss) * float(tokens), float(tokens)], env.device)
        return s[0] / max(s[1], 1.0)

    start_step = 0
    if state is not None:
        ckpt_io.load(resume, student, optimizer)  # weights + AdamW state (param_groups' lr included)
        scheduler.load_state_dict(state["scheduler"])
        start_step, initial_loss = state["step"], float(state["initial_loss"])
        tokens_before = int(state.get("tokens", 0))  # older checkpoints did not count: 0
        if env.is_main:
            trim_metrics(metrics_path, start_step)
        log.info("resumed from %s at step %d (checkpoint world size %d, now %d)", resume, start_step,
                 state["world_size"], W)
        say("log", {"msg": f"resumed from {resume} at step {start_step}"})
    else:
        tokens_before = 0
        if env.is_main:
            metrics_path.unlink(missing_ok=True)
        initial_loss = probe_loss()
        log.info("start: %s world_size=%d device=%s autocast_bf16=%s initial_loss=%.6f", mode, W, env.device,
                 autocast, initial_loss)
    # eval reads the held-out split: the prepared set's folder, or (in-memory blocks) a file rank 0 writes
    heldout_path = Path(packed.root).resolve() if hasattr(packed, "root") else run_dir / HELDOUT_FILE
    if env.is_main and not hasattr(packed, "root"):
        save_file({"heldout": packed.heldout}, heldout_path)
    say("log", {"msg": f"{mode} on {W} ranks ({env.device}), global batch {global_batch}, "
                       f"steps {start_step}->{tc.steps}, initial_loss={initial_loss:.6f}"})

    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens_trained = 0  # what the loss saw in this attempt, all ranks (labels != -100)

    def prepare(micro: int, b):  # on-policy: the draw and the generation, before any backward
        policy.at(step, micro)
        with torch.no_grad():
            return model(b, prepare=True)

    def forward(b, normalizer: float):
        return model(b, normalizer=normalizer)

    reduce = lambda values: all_reduce_sum(values, env.device)  # noqa: E731
    ckpt = resume
    metrics = open(metrics_path, "a", encoding="utf-8") if env.is_main else None
    try:
        for step in range(start_step, tc.steps):
            t_step = time.perf_counter()
            torch.manual_seed(tc.seed * 1_000_003 + step * 1009 + env.rank)
            optimizer.zero_grad(set_to_none=True)
            # every trained token of the step weighs the same, on every rank (kd/train/loss_normalization.py);
            # gradients cross ranks once per step, on the last micro-batch
            done_step = run_step([batch(step, micro, tc.grad_accum) for micro in range(tc.grad_accum)],
                                 forward=forward, prepare=prepare if policy is not None else None, world_size=W,
                                 reduce_sum=reduce, sync=lambda last: no_sync(model, last))
            tokens_trained += done_step.tokens
            grad_norm = _grad_norm(torch.nn.utils.clip_grad_norm_(student.parameters(), tc.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            dt = time.perf_counter() - t_step
            row = {"step": step + 1, "loss": done_step.loss, "ce": done_step.ce, "kd": done_step.kd, "lr": lr,
                   "grad_norm": grad_norm, "tokens": done_step.tokens, "tokens_per_s": done_step.tokens / dt,
                   "step_s": dt, "world_size": W}
            if policy is not None:  # generation: tokens and samples summed over ranks, seconds their mean (the
                st = policy.take_stats()  # ranks generate in parallel); batch kinds are the same on every rank
                red_gen = all_reduce_sum([st["gen_s"], float(st["gen_tokens"]), float(st["samples"]),
                                          float(st["stopped"])], env.device)
                st.update(gen_s=red_gen[0] / W, gen_tokens=int(red_gen[1]), samples=int(red_gen[2]),
                          stopped=int(red_gen[3]))
                row.update(generation_row(st, dt))
            if not math.isfinite(row["loss"]):
                log.error("non-finite loss at step %d: %s", step + 1, row)
            if metrics is not None and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                log.info("step %d/%d loss=%.5f ce=%.5f kd=%.5f lr=%.3g grad_norm=%.4g tok/s=%.0f", step + 1,
                         tc.steps, row["loss"], row["ce"], row["kd"], lr, grad_norm, row["tokens_per_s"])
            done = step + 1
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
                ckpt = ckpt_io.save(run_dir, done, student, optimizer,
                                    {"initial_loss": initial_loss, "global_batch": global_batch, "world_size": W,
                                     "tokens": tokens_before + tokens_trained,
                                     "distributed": mode, "scheduler": scheduler.state_dict()}, student_dir, env.is_main)
                log.info("checkpoint %s", ckpt)
            say("step", {**row, "total_steps": tc.steps, "checkpoint": str(ckpt) if ckpt else None})
            if after_checkpoint is not None:
                after_checkpoint(done)
    finally:
        if metrics is not None:
            metrics.close()

    student.eval()
    final_loss = probe_loss()
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device_type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak = int(all_reduce_sum([float(peak)], env.device)[0] / W)  # mean per rank
    log.info("done: initial_loss=%.6f final_loss=%.6f wall_s=%.1f", initial_loss, final_loss, wall)
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    if not env.is_main:
        return None
    assert ckpt is not None
    return TrainResult(
        run_dir=str(run_dir), checkpoint_dir=str(ckpt), checkpoint_sha256=hash_dir(ckpt),
        metrics_path=str(metrics_path), log_path=str(run_dir / "train.log"), heldout_path=str(heldout_path),
        steps=tc.steps, resumed_from_step=start_step, tokens=tokens_before + tokens_trained,
        initial_loss=initial_loss, final_loss=final_loss, loss_normalization=NORMALIZATION,
        tokens_per_s=tokens_trained / max(wall, 1e-9), wall_s=wall,
        **({"teacher_cache": teacher_cache} if offline is not None else {}),
        **({"on_policy": on_policy_summary(cfg, metrics_path)} if policy is not None else {}),
        peak_memory_bytes=peak, device=f"{device_type} x{W} ({mode})",
        dtype=("bfloat16-autocast" if autocast else "float32") + ("" if tc.param_dtype == "float32" else "/bf16-params"),
    )
