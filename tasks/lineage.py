"""Lineage from what the flow itself saw: which cached steps were Prefect cache hits, and who computed each.

Prefect 3 delivers task-run states to the server asynchronously, so reading them back right after a
step can return an older state (a `Cached` hit read as `Running` or `Completed`). The flow does not
ask: each cached step is called with `return_state=True`, and the State the engine hands back in
this process is the truth. Who computed a result travels inside the result (`produced_by`), so a
cache hit names its producer without a server query.

    steps = StepStates()
    prepared = steps.run("prepare_data", prepare_data_task.with_options(**opts), config, student, teacher)
    ...
    lineage = step_lineage(steps.cached, run_name, flow_run_id, results)
"""

from __future__ import annotations

from typing import Any

from kd.results import StepLineage

CACHED_STEPS = ("pull_models", "check_vocab", "prepare_data", "cache_teacher_logits", "train_student", "train_control",
                "evaluate_baselines", "evaluate")


class StepStates:
    """Calls tasks and records, per step, whether the State returned in this process is `Cached`."""

    def __init__(self) -> None:
        self.cached: dict[str, bool] = {}

    def run(self, step: str, task, *args, **kwargs) -> Any:
        return self.run_state(step, task, *args, **kwargs).result()  # raises as a plain call would

    def run_state(self, step: str, task, *args, **kwargs):
        state = task(*args, return_state=True, **kwargs)
        self.cached[step] = state.name == "Cached"
        return state

    def note(self, step: str, cached: bool) -> None:
        """A step run elsewhere (a deployment) whose cache status the caller learnt from its result."""
        self.cached[step] = cached


def _producer(result: Any):
    """The Provenance a result carries; pull_models returns (teacher, student): the teacher's."""
    if isinstance(result, (tuple, list)):
        result = result[0] if result else None
    return getattr(result, "produced_by", None)


def step_lineage(cached: dict[str, bool], run_name: str, flow_run_id: str | None,
                 results: dict[str, Any]) -> dict[str, StepLineage]:
    """{step: StepLineage} for the cached steps this run reached. `cached` comes from the States this
    flow saw; a step it did not see itself (training on a deployment) falls back to its result's own
    provenance: computed by this run iff the result names this run."""
    from tasks.policy import STALE_REASONS

    out: dict[str, StepLineage] = {}
    for step in CACHED_STEPS:
        prov = _producer(results.get(step))
        if step not in cached and prov is None:
            continue
        hit = cached[step] if step in cached else prov.run_name != run_name
        out[step] = StepLineage(
            cached=hit,
            produced_by_run=(prov.run_name if prov else None) if hit else run_name,
            flow_run_id=(prov.flow_run_id if prov else None) if hit else flow_run_id,
            rerun_reason=STALE_REASONS.pop((str(flow_run_id), step), None),
        )
    return out
