"""Task `train_student`: KD training (kd/train/); a retry resumes from the run's last checkpoint.

Cached on what determines the weights: the training-relevant config, both models' content,
the data's content and the code version. Training holds one slot of the global concurrency limit
`orchestration.gpu_slots` (see tasks/slots.py), so two trainings never share a GPU. Three ways to run:
in this process (kd.train.loop), as torchrun's ranks (`train.distributed`: kd.train.distributed.launch),
or as one flow run per node (`train.rendezvous.nnodes > 1`, below).

Several nodes (issue 19):
With `train.rendezvous.nnodes = M > 1` the task calls `train_multinode`, which
  1. decides the rendezvous (kd.train.distributed.nodes.Rendezvous: hosts the c10d store on a free port
     unless train.rendezvous.endpoint is given; a new rendezvous id per attempt) and writes the
     shared-storage probes;
  2. starts M flow runs of `orchestration.node_deployment` (default `kd-train-node/gpu`, the
     `kd_train_node` flow of flows/multinode.py, on the `gpu` pool) with run_deployment(timeout=0): node i runs
     torchrun for its node against that rendezvous (kd.train.distributed.nodes.run_node);
  3. streams rank 0's events (step lines, progress artifact) from whichever node holds rank 0,
     and polls the node runs: all Completed -> rank 0's TrainResult; one Failed/Crashed/Cancelled, or
     no progress for train.rank_timeout_s (a node that never arrived, a hung job) -> every other node
     run is cancelled and the step raises TransientError (the task's retry starts M new node runs
     that resume from the last DCP checkpoint) or the node's InputError (no retry);
  4. on any exception in the step itself (the parent cancelled, Ctrl-C) cancels every node run.

Node runs are cancelled through Prefect (state Cancelling: the worker that started the run kills
its process, whose supervisor kills torchrun and its ranks); a run still not final after
STOP_WAIT_S (its worker is gone, e.g. the node died) is forced to Cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from kd.config import RunConfig
from kd.errors import ConfigError, InputError, TransientError
from kd.data import data_fingerprint, model_max_positions, open_prepared, pack_dataset
from kd.hashing import code_version
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, TrainResult, VocabAlignment
from kd.teacher_cache.step import check_cache_is_for
from kd.train.loop import train_student
from tasks.policy import content_key, fresh_key, provenance, resume_fingerprint, retry_transient, train_outputs_problems
from tasks import artifacts
from tasks.slots import gpu_slot

POLL_S = 1.0  # how often the step reads the node runs' states
STOP_WAIT_S = 30.0  # how long a cancelled node run gets to reach a final state before it is forced


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
        result = train_multinode(config, teacher, student, alignment, run_name, prepared, teacher_cache, run_dir,
                                 _rank0_logger(get_run_logger(), on_step))
        result = result.model_copy(update={"produced_by": provenance(run_name)})
        artifacts.train_metrics(result)
        return result
    with gpu_slot(config.orchestration.gpu_slots):
        if config.train.distributed != "none":  # torchrun, N ranks: kd/train/distributed (issue 14)
            result = _train_with_torchrun(config, teacher, student, alignment, packed,
                                          run_dir, on_step, teacher_cache)
        elif served_on_policy_needed(config):  # the engine scores on-policy samples: up for this step only
            result = _train_with_served_teacher(config, teacher, student, alignment, packed, run_dir, on_step,
                                                teacher_cache)
        else:
            result = train_student(config, teacher.local_dir, student.local_dir, alignment, packed,
                                   run_dir, on_step=on_step, teacher_cache=teacher_cache)
    result = result.model_copy(update={"produced_by": provenance(run_name)})  # a cache hit keeps naming this run
    artifacts.train_metrics(result)
    return result


def served_on_policy_needed(config: RunConfig) -> bool:
    """teacher.server with kd.on_policy.fraction > 0: training asks the engine to score the student's samples."""
    return config.teacher.server is not None and config.kd.on_policy.fraction > 0


def _train_with_served_teacher(config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot,
                               alignment: VocabAlignment, packed, run_dir: Path, on_step,
                               teacher_cache: TeacherCacheResult | None) -> TrainResult:
    """Training inside the engine's lifetime: `teacher.server.url` as given, or `launch: vllm` started here and
    stopped (its whole process group) when training ends or fails, before the task returns or retries. The
    result's on_policy.teacher_server names the engine, its start-up and how it was stopped."""
    from kd.teacher_server.on_policy import served_on_policy

    log, record = get_run_logger(), {}
    with served_on_policy(config, teacher.local_dir, teacher.repo, alignment, log_dir=run_dir, record=record) as scorer:
        info = scorer.describe()
        log.info("teacher server %s (%s %s, %s): scores the on-policy samples, prompt_logprobs %d",
                 info["url"], info["engine"], info.get("engine_version"),
                 "launched for this step" if info["launched"] else "given", info["prompt_logprobs"])
        result = train_student(config, teacher.local_dir, student.local_dir, alignment, packed, run_dir,
                               on_step=on_step, teacher_cache=teacher_cache, teacher_scorer=scorer)
    launch = record.get("launch", {})
    served = {**(result.on_policy or {}).get("teacher_server", {}),
              "startup_s": launch.get("startup_s"), "stop": launch.get("stop"), "log": launch.get("log")}
    log.info("teacher server stopped: %s", launch.get("stop") or "not launched by this step")
    return result.model_copy(update={"on_policy": {**(result.on_policy or {}), "teacher_server": served}})


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


# ---------------------------------------------------------------- several nodes: one flow run per node
def train_multinode(config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment,
                    run_name: str, prepared: PreparedData | None, teacher_cache: TeacherCacheResult | None,
                    run_dir: Path, on_event: Callable[[dict], None]) -> TrainResult:
    """Start one `orchestration.node_deployment` run per node, watch them as one job, return rank 0's result."""
    from prefect.deployments import run_deployment

    from kd.train.distributed.nodes import Rendezvous

    log = get_run_logger()
    nnodes, name = config.train.rendezvous.nnodes, config.orchestration.node_deployment
    check_node_pool(name, nnodes)
    common = {"config": config.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"),
              "student": student.model_dump(mode="json"), "alignment": alignment.model_dump(mode="json"),
              "run_name": run_name, "prepared": None if prepared is None else prepared.model_dump(mode="json"),
              "teacher_cache": None if teacher_cache is None else teacher_cache.model_dump(mode="json")}
    runs: list = []
    with Rendezvous(config, run_dir, run_name) as rdzv:
        log.info("%d nodes x %s ranks, rendezvous %s (id %s, c10d store %s)", nnodes, config.train.nproc_per_node,
                 rdzv.endpoint, rdzv.id, "hosted by this step" if rdzv.store_is_elsewhere else "on a node")
        try:
            for i in range(nnodes):
                runs.append(run_deployment(name, parameters={**common, **rdzv.node_parameters(i)}, timeout=0))
            _watch(runs, rdzv, config.train.rank_timeout_s, on_event, log)
        except BaseException as err:
            stopped = stop_node_runs(runs, f"training stopped: {type(err).__name__}: {err}"[:500])
            log.error("stopped the node runs: %s", stopped)
            raise
    result_path = run_dir / "launch" / "result.json"
    if not result_path.is_file():
        raise TransientError(f"every node completed but rank 0 wrote no {result_path}")
    return TrainResult.model_validate_json(result_path.read_text())


def check_node_pool(name: str, nnodes: int) -> None:
    """The node deployment exists and its work pool may run all nodes at once (else they never all arrive)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"orchestration.node_deployment: no deployment {name!r} on this Prefect server "
                              "(`make up`, or `prefect deploy -n kd-train-node/gpu`)") from None
        pool = client.read_work_pool(dep.work_pool_name) if dep.work_pool_name else None
    if pool is not None and pool.concurrency_limit is not None and pool.concurrency_limit < nnodes:
        raise ConfigError(f"orchestration.node_deployment: work pool {pool.name!r} runs at most "
                          f"{pool.concurrency_limit} flow run(s) at once but train.rendezvous.nnodes={nnodes} nodes "
                          f"must run together: `prefect work-pool set-concurrency-limit {pool.name} {nnodes}` (or more)")


def _watch(runs: list, rdzv, timeout_s: float, on_event: Callable[[dict], None], log) -> None:
    """Relay rank 0's events until every node run completed; raise when one ends otherwise or all go silent."""
    from prefect.client.orchestration import get_client

    last_progress, seen, next_poll = time.monotonic(), {}, 0.0
    with get_client(sync_client=True) as client:
        while True:
            for event in rdzv.new_events():
                last_progress = time.monotonic()
                on_event(event)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_S
                current = [client.read_flow_run(r.id) for r in runs]
                states = {r.id: (r.state.type.value if r.state else "NONE") for r in current}
                if states != seen:
                    seen, last_progress = states, time.monotonic()
                    log.info("node runs: %s", ", ".join(f"{r.name} {r.state.name if r.state else '?'}" for r in current))
                bad = [r for r in current if r.state is not None and r.state.is_final() and not r.state.is_completed()]
                if bad:
                    raise _node_failure(bad[0], runs)
                if all(r.state is not None and r.state.is_completed() for r in current):
                    for event in rdzv.new_events():
                        on_event(event)
                    return
            silent = time.monotonic() - last_progress
            if silent > timeout_s:
                raise TransientError(
                    f"multi-node training made no progress for {silent:.0f} s (train.rank_timeout_s={timeout_s:g}): "
                    f"a node never arrived or the job hung; node runs: "
                    + ", ".join(f"{r.name} {r.state.name if r.state else '?'}" for r in current))
            time.sleep(0.2)


def _node_failure(run, runs: list) -> BaseException:
    cause = child_exception(run.state)
    where = f"node {runs.index(next(r for r in runs if r.id == run.id))} (flow run {run.name!r}, {run.id})"
    if isinstance(cause, InputError):
        return type(cause)(f"{where}: {cause}")
    return TransientError(f"{where} ended {run.state.name}: {getattr(run.state, 'message', '') or cause}; every node "
                          "was stopped and a retry resumes all of them from the last checkpoint")


def stop_node_runs(runs: list, why: str, wait_s: float = STOP_WAIT_S) -> dict[str, str]:
    """Cancel every node run not yet final; force Cancelled on those whose worker never answers.
    Returns {run name: final state name}."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    out: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        pending = []
        for r in runs:
            r = client.read_flow_run(r.id)
            if r.state is not None and r.state.is_final():
                out[r.name] = r.state.name
                continue
            scheduled = r.state is None or r.state.is_scheduled()
            client.set_flow_run_state(r.id, Cancelled(message=why) if scheduled else Cancelling(message=why),
                                      force=True)
            pending.append(r)
        deadline = time.monotonic() + wait_s
        while pending:
            still = []
            for r in pending:
                r = client.read_flow_run(r.id)
                if r.state is not None and r.state.is_final():
                    out[r.name] = r.state.name
                else:
                    still.append(r)
            pending = still
            if pending and time.monotonic() > deadline:
                for r in pending:  # no worker acted on Cancelling: its process is gone (a dead node)
                    client.set_flow_run_state(r.id, Cancelled(message=why + " (forced: no worker answered)"),
                                              force=True)
                    out[r.name] = "Cancelled (forced)"
                break
            if pending:
                time.sleep(0.5)
    return out


def child_exception(state) -> BaseException | None:
    """The exception a child flow run (a deployment run) raised, when its failed state carries one we can load."""
    if state is None:
        return None
    try:
        value = state.result(raise_on_failure=False)
    except Exception:  # result storage unreachable from here, or nothing persisted: the message must do
        return None
    return value if isinstance(value, BaseException) else None
