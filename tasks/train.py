"""Task `train_student`: KD training in-process; a retry resumes from the run's last checkpoint.

Cached on what determines the weights: the training-relevant config, both models' content,
the data's content and the code version. Training holds one slot of the global concurrency limit
`orchestration.gpu_slots` (see tasks/slots.py), so two trainings never share a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from kd.config import RunConfig
from kd.data import data_fingerprint, model_max_positions, open_prepared, pack_dataset
from kd.hashing import code_version
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, TrainResult, VocabAlignment
from kd.teacher_cache.step import check_cache_is_for
from kd.train.loop import train_student
from tasks.policy import content_key, fresh_key, provenance, resume_fingerprint, retry_transient, train_outputs_problems
from tasks import artifacts
from tasks.slots import gpu_slot


def _train_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    t, s = parameters["teacher"], parameters["student"]
    train_cfg = cfg.train.model_dump(exclude={"resume_from", "log_every"})
    prepared = parameters.get("prepared")
    # the prepared files' sha256 (and whether they are still there), else the raw sources' content
    data = ([prepared.content_hash, Path(prepared.path, "manifest.json").is_file()] if prepared is not None
            else data_fingerprint(cfg.data))
    key = content_key("train", t.content_hash, s.content_hash, parameters["alignment"].identity(),
                      data, cfg.data.model_dump(exclude={"num_proc"}), cfg.kd.model_dump(), train_cfg,
                      code_version(), resume_fingerprint(cfg.train.resume_from), _cache_part(parameters))
    # a hit whose checkpoint/metrics/log are gone or changed (or held relative paths) runs again
    return fresh_key(context, key, train_outputs_problems, "train_student")


def _cache_part(parameters) -> list | None:
    """Offline mode: the teacher cache trained from (its content address and manifest hash)."""
    c = parameters.get("teacher_cache")
    return None if c is None else [c.key, c.manifest_sha256]


@task(name="train_student", cache_key_fn=_train_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def train_student_task(
    config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment, run_name: str,
    prepared: PreparedData | None = None, teacher_cache: TeacherCacheResult | None = None, folder: str | None = None,
) -> TrainResult:
    """`folder`: the work folder's name when it is not `run_name` (the control arm trains beside the run)."""
    if teacher_cache is not None and prepared is not None:  # never train from another teacher's/data's cache
        check_cache_is_for(config, teacher_cache, teacher, alignment, prepared)
    # the prepare_data step's memory-mapped set; prepared here only when called without one (several
    # nodes: each node's ranks open it, or pack data.source, themselves)
    packed = (None if config.train.rendezvous.nnodes > 1
              else open_prepared(prepared.path) if prepared is not None
              else pack_dataset(config.data, student.local_dir, max_positions=model_max_positions(student.local_dir),
                                min_train_blocks=config.train.batch_size))
    progress_id = create_progress_artifact(progress=0.0, key="train-progress",
                                           description=f"Training {config.train.steps} steps")
    every = max(1, config.train.steps // 50)
    log, first = get_run_logger(), []  # first: (step before the first one seen, its time), for the ETA

    def on_step(row: dict) -> None:
        first or first.extend((row["step"] - 1, time.perf_counter() - row.get("step_s", 0.0)))
        last = row["step"] == row["total_steps"]
        if (row["step"] % config.train.log_every == 0 or last) and "world_size" not in row:
            log.info(artifacts.step_line(row))  # the run's Logs tab (torchrun events are logged by their launcher)
        if row["step"] % every == 0 or last:
            update_progress_artifact(progress_id, progress=100.0 * row["step"] / row["total_steps"],
                                     description=artifacts.progress_text(row, time.perf_counter() - first[1],
                                                                         first[0]))

    run_dir = Path(config.work_dir).expanduser().resolve() / (folder or run_name)  # results hold absolute paths
    if config.train.rendezvous.nnodes > 1:  # one flow run per node on the node deployment's pool (issue 19)
        from tasks.multinode import train_multinode

        result = train_multinode(config, teacher, student, alignment, run_name, prepared, teacher_cache, run_dir,
                                 _rank0_logger(get_run_logger(), on_step))
        result = result.model_copy(update={"produced_by": provenance(run_name)})
        artifacts.train_metrics(result)
        return result
    with gpu_slot(config.orchestration.gpu_slots):
        if config.train.distributed != "none":  # torchrun, N ranks: kd/train/distributed (issue 14)
            result = _train_with_torchrun(config, teacher, student, alignment, packed,
                                          run_dir, on_step, teacher_cache)
        else:
            result = train_student(config, teacher.local_dir, student.local_dir, alignment, packed,
                                   run_dir, on_step=on_step, teacher_cache=teacher_cache)
    result = result.model_copy(update={"produced_by": provenance(run_name)})  # a cache hit keeps naming this run
    artifacts.train_metrics(result)
    return result


def _train_with_torchrun(config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot,
                         alignment: VocabAlignment, packed, run_dir: Path, on_step,
                         teacher_cache: TeacherCacheResult | None = None) -> TrainResult:
    """Launch torchrun as a child (own process group), stream rank 0 into the run log and progress
    artifact. A dead or silent rank raises TransientError within train.rank_timeout_s (the job is
    killed), so the task's retry resumes from the last distributed checkpoint; bad input raises the
    InputError the worker reported (no retry)."""
    from kd.train.distributed.launch import run_torchrun

    on_event = _rank0_logger(get_run_logger(), on_step)
    return run_torchrun(config, teacher.local_dir, student.local_dir, alignment, run_dir,
                        prepared_dir=getattr(packed, "root", None), teacher_cache=teacher_cache, on_event=on_event,
                        on_line=lambda line: get_run_logger().info("torchrun | %s", line))


def _rank0_logger(log, on_step):
    """Rank 0's KDFLOW events -> the run log and the progress artifact."""

    def on_event(event: dict) -> None:
        kind = event.get("kind")
        if kind == "step":
            on_step(event)
            log.info("step %d/%d loss=%.5f ce=%.5f kd=%.5f lr=%.3g grad_norm=%.4g tok/s=%.0f (%d ranks)",
                     event["step"], event["total_steps"], event["loss"], event["ce"], event["kd"], event["lr"],
                     event["grad_norm"], event["tokens_per_s"], event["world_size"])
        elif kind == "error":
            log.error("rank 0: %s: %s", event.get("class"), event.get("msg"))
        elif kind == "log":
            log.info("rank 0: %s", event.get("msg"))

    return on_event
