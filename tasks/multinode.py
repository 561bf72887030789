"""Multi-node training through Prefect: the training step places one flow run per node and watches them as one job.

With `train.rendezvous.nnodes = M > 1` the `train_student` task (tasks/train.py) calls `train_multinode`, which
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

from prefect.logging import get_run_logger

from kd.config import RunConfig
from kd.errors import ConfigError, InputError, TransientError
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, TrainResult, VocabAlignment

POLL_S = 1.0  # how often the step reads the node runs' states
STOP_WAIT_S = 30.0  # how long a cancelled node run gets to reach a final state before it is forced


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
