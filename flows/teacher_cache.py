"""The `kd-teacher-cache` flow: the teacher-cache step on its own, so it can run on another work pool.

The teacher is the big model: its forward passes are what a teacher pool with large GPUs is for, while
training (kd-train/gpu) needs only the student. Deploy this flow on that pool and point the distill
flow at it:

    kdflow run configs/smoke.yaml --set kd.teacher_mode=offline \
        --set orchestration.cache_deployment=kd-teacher-cache/teacher

`cache_step` is what the distill and sweep flows call: the step in-process, or (with
`orchestration.cache_deployment` set) `cache_via_deployment`, which starts the child run with
`run_deployment(..., timeout=None)`, waits, and returns its persisted `TeacherCacheResult` (a folder path and numbers): `kd.cache_dir` must then be storage that
both pools see. A child that failed on bad input re-raises that InputError (exit 2).
"""

from __future__ import annotations

from prefect import flow

from kd.config import RunConfig
from kd.errors import InputError
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, VocabAlignment
from tasks.lineage import StepStates
from tasks.teacher_cache import STEP, cache_artifact, cache_teacher_logits_task

POLL_S = 2.0


class CacheDeploymentFailed(RuntimeError):
    """The delegated teacher-cache flow run ended in a state other than Completed."""


@flow(name="kd-teacher-cache", flow_run_name="teacher-cache-{run_name}", persist_result=True, log_prints=True,
      validate_parameters=True)
def kd_teacher_cache(config: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment, prepared: PreparedData,
                     run_name: str) -> TeacherCacheResult:
    """Build (or verify and reuse) the teacher's top-k cache for `prepared`."""
    o = config.orchestration
    step = cache_teacher_logits_task.with_options(refresh_cache=o.refresh_cache or None, retries=o.retries,
                                                  retry_delay_seconds=o.retry_delay_s)
    return step(config, teacher, alignment, prepared, run_name)


def cache_via_deployment(config: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment,
                         prepared: PreparedData, run_name: str) -> TeacherCacheResult:
    from prefect.deployments import run_deployment

    name = config.orchestration.cache_deployment
    assert name, "orchestration.cache_deployment is not set"
    params = {"config": config.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"),
              "alignment": alignment.model_dump(mode="json"), "prepared": prepared.model_dump(mode="json"),
              "run_name": run_name}
    child = run_deployment(name, parameters=params, timeout=None, poll_interval=POLL_S)
    state = child.state
    where = f"teacher-cache deployment {name}: flow run {child.name!r} ({child.id})"
    if state is None or not state.is_completed():
        try:
            cause = state.result(raise_on_failure=False) if state is not None else None
        except Exception:  # result storage unreachable from here: the message must do
            cause = None
        if isinstance(cause, InputError):
            raise type(cause)(f"{where}: {cause}") from cause
        raise CacheDeploymentFailed(f"{where} ended in {'no state' if state is None else state.name}: "
                                    f"{getattr(state, 'message', None)}")
    result = state.result()
    return result if isinstance(result, TeacherCacheResult) else TeacherCacheResult.model_validate(result)


def cache_step(config: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment, prepared: PreparedData,
               run_name: str, steps: StepStates | None = None, **opts) -> TeacherCacheResult:
    """Run the step (in-process or on its deployment); a Prefect cache hit is reported as `reused` with
    zero teacher forwards, still naming the run that built the cache."""
    if config.orchestration.cache_deployment:
        return cache_via_deployment(config, teacher, alignment, prepared, run_name)
    steps = steps or StepStates()
    state = steps.run_state(STEP, cache_teacher_logits_task.with_options(**opts), config, teacher, alignment,
                            prepared, run_name)
    result = state.result()
    if state.name == "Cached":
        result = result.model_copy(update={"status": "reused", "shards_built": 0, "teacher_forwards": 0})
        cache_artifact(result, prefect_cached=True)
    return result
