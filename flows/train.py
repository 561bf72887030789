"""The `kd-train` flow: the training step on its own, so it can run on the `gpu` work pool.

A Prefect task cannot be sent to another work pool; a flow deployment can. `make up` deploys this
flow as `kd-train/gpu` (see prefect.yaml) and starts a worker on the `gpu` pool. The distill flow
then delegates training to it when `orchestration.train_deployment` is set:

    kdflow run configs/smoke.yaml --set orchestration.train_deployment=kd-train/gpu

`train_via_deployment` starts the child run with `run_deployment(..., timeout=None)` (it shows as a
subflow of the distill run), waits, and returns the child's persisted `TrainResult` (paths and
numbers, no tensors). The checkpoint and held-out paths in it must be readable where evaluation runs: on one
host it is; across hosts, put `work_dir` on shared storage (docs/prefect.md).
A child that does not complete fails the parent with `TrainingDeploymentFailed` naming the child
run and its final state; a child that failed on bad input (kd.errors.InputError) re-raises that
error, so the CLI still exits 2.
"""

from __future__ import annotations

from prefect import flow

from kd.config import RunConfig
from kd.errors import InputError
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, TrainResult, VocabAlignment
from tasks.train import child_exception, train_student_task

POLL_S = 2.0  # how often the parent asks the server whether the child has finished


class TrainingDeploymentFailed(RuntimeError):
    """The delegated training flow run ended in a state other than Completed."""


@flow(name="kd-train", flow_run_name="train-{run_name}", persist_result=True, log_prints=True,
      validate_parameters=True)
def kd_train(
    config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment, run_name: str,
    prepared: PreparedData | None = None, teacher_cache: TeacherCacheResult | None = None,
) -> TrainResult:
    """Train `config.student` from `config.teacher` (snapshots already pulled, vocab aligned, data prepared)."""
    o = config.orchestration
    train = train_student_task.with_options(refresh_cache=o.refresh_cache or None, retries=o.retries,
                                            retry_delay_seconds=o.retry_delay_s)
    return train(config, teacher, student, alignment, run_name, prepared, teacher_cache)


def train_via_deployment(
    config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment, run_name: str,
    prepared: PreparedData | None = None, teacher_cache: TeacherCacheResult | None = None,
) -> TrainResult:
    """Run `kd_train` as the deployment `config.orchestration.train_deployment` and wait for it."""
    from prefect.deployments import run_deployment

    name = config.orchestration.train_deployment
    assert name, "orchestration.train_deployment is not set"
    parameters = {"config": config.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"),
                  "student": student.model_dump(mode="json"), "alignment": alignment.model_dump(mode="json"),
                  "run_name": run_name, "prepared": None if prepared is None else prepared.model_dump(mode="json"),
                  "teacher_cache": None if teacher_cache is None else teacher_cache.model_dump(mode="json")}
    child = run_deployment(name, parameters=parameters, timeout=None, poll_interval=POLL_S)
    state = child.state
    where = f"training deployment {name}: flow run {child.name!r} ({child.id})"
    if state is None or not state.is_completed():
        cause = child_exception(state)
        if isinstance(cause, InputError):
            raise type(cause)(f"{where}: {cause}") from cause
        status = "no state" if state is None else f"state {state.name}"
        raise TrainingDeploymentFailed(f"{where} ended in {status}: {getattr(state, 'message', None)}")
    result = state.result()
    return result if isinstance(result, TrainResult) else TrainResult.model_validate(result)

