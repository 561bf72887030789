"""The distillation DAG: preflight -> pull -> vocab check -> prepare data -> train -> eval -> evidence.

    kdflow run configs/smoke.yaml            # or: kdflow smoke
    python -c "from flows.distill import distill; from kd.config import load_config; \
               distill(load_config('configs/smoke.yaml'))"

Routing only: each step is a task in `tasks/`, its logic in `kd/`. Once preflight has passed,
evidence is written whatever happens next, so a failed run leaves a `fail` manifest behind.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.teacher_cache import cache_step
from flows.train import train_via_deployment
from kd.config import ModelRef, RunConfig, default_run_name, short_model_name
from kd.errors import GateFailure
from kd.evaluate.control import control_config
from kd.evaluate.ship import ship_line
from kd.evidence.manifest import claim_run_name
from kd.evidence.verdicts import failure_reasons
from tasks.evaluate import evaluate, evaluate_baselines
from tasks.evidence import write_evidence_task
from tasks.lineage import StepStates
from tasks.preflight import preflight
from tasks.prepare import prepare_data_task
from tasks.pull import pull_models
from tasks.train import train_student_task
from tasks.vocab import check_vocab


def _flow_run_name() -> str:
    cfg = flow_run.parameters["config"]
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.model_validate(cfg)
    return cfg.name or default_run_name(cfg, datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))


def _name_refused_run(flow, run, state) -> None:
    """on_failure hook: a run refused before it started (its parameters failed validation, so Prefect
    never called `_flow_run_name`) keeps a random name; give it the name every other run gets."""
    from prefect.client.orchestration import get_client

    raw = run.parameters.get("config")
    raw = raw.model_dump() if isinstance(raw, RunConfig) else raw if isinstance(raw, dict) else {}
    when = (run.start_time or run.expected_start_time or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    repo = lambda role: ModelRef.model_construct(repo=str((raw.get(role) or {}).get("repo") or role))  # noqa: E731
    name = raw.get("name") or f"distill-{short_model_name(repo('student'))}-from-{short_model_name(repo('teacher'))}-{when}"
    if run.name != name and not run.name.startswith("distill-"):
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, name=name)


@flow(name="distill", flow_run_name=_flow_run_name, log_prints=True, validate_parameters=True,
      on_failure=[_name_refused_run])
def distill(config: RunConfig) -> dict:
    """Distil `config.teacher` into `config.student`; returns the manifest summary, raises if the run fails."""
    start = datetime.now(timezone.utc)
    run_name = flow_run.name or config.name or default_run_name(config, start.strftime("%Y%m%d-%H%M%S"))
    # a run folder is never reused: an explicit `name` that exists is refused (exit 2) before any work
    run_name = claim_run_name(config, run_name, suffix=str(flow_run.id or "")[:8] or start.strftime("%f"))
    refresh = config.orchestration.refresh_cache
    opts = dict(refresh_cache=refresh or None, retries=config.orchestration.retries,
                retry_delay_seconds=config.orchestration.retry_delay_s)

    report = preflight(config)
    teacher = student = alignment = prepared = teacher_cache = training = control = baselines = evaluation = None
    failure = None
    steps = StepStates()  # which steps were cache hits, from the States returned here (never a server read)
    try:
        teacher, student = steps.run("pull_models", pull_models.with_options(**opts), config)
        alignment = steps.run("check_vocab", check_vocab.with_options(refresh_cache=refresh or None),
                              config, teacher, student)
        prepared = steps.run("prepare_data", prepare_data_task.with_options(**opts), config, student, teacher)
        if config.kd.teacher_mode == "offline":  # the teacher runs once here; training never loads it
            teacher_cache = cache_step(config, teacher, alignment, prepared, run_name, steps, **opts)
        if config.orchestration.train_deployment:  # e.g. kd-train/gpu: runs on the gpu work pool's worker
            training = train_via_deployment(config, teacher, student, alignment, run_name, prepared, teacher_cache)
        else:
            training = steps.run("train_student", train_student_task.with_options(**opts), config, teacher,
                                 student, alignment, run_name, prepared, teacher_cache)
        if config.eval.control:  # the same student fine-tuned (alpha = 1): one cached step every KD setting shares
            control = steps.run("train_control", train_student_task.with_options(name="train_control", **opts),
                                control_config(config), teacher, student, alignment, run_name, prepared,
                                folder=f"{run_name}-control")
        # the teacher and student-before once (a sweep's trials share it), then the trained student
        baselines = steps.run("evaluate_baselines", evaluate_baselines.with_options(refresh_cache=refresh or None),
                              config, teacher, student, alignment, prepared)
        evaluation = steps.run("evaluate", evaluate.with_options(refresh_cache=refresh or None), config, teacher,
                               student, alignment, training, prepared, control, baselines)
    except Exception as err:  # recorded in the evidence, then re-raised: a failed run stays failed
        failure = err
    manifest = write_evidence_task(
        config, run_name, start, report, teacher, student, alignment, training, evaluation,
        failure=None if failure is None else f"{type(failure).__name__}: {failure}",
        flow_run_id=str(flow_run.id) if flow_run.id else None, flow_run_url=flow_run.ui_url, prepared=prepared,
        cached_steps=steps.cached, teacher_cache=teacher_cache, control=control, baselines=baselines,
    )
    if failure is not None:
        raise failure
    ship = manifest.eval.ship if manifest.eval is not None else None
    if manifest.run.status != "pass":  # every reason: failed falsifiers and what was missing (notes); the alert shows it
        raise GateFailure(f"run {run_name} failed its gates: {'; '.join(failure_reasons(manifest.falsifiers, manifest.notes))}"
                          f" | {ship_line(ship)}")
    print(f"run {run_name}: pipeline PASS | {ship_line(ship)}")
    evidence = Path(config.evidence_dir).expanduser().resolve() / run_name
    return {"run": run_name, "status": manifest.run.status, "evidence": str(evidence),
            "ship": ship.verdict if ship is not None else None,
            "falsifiers": {f.id: f.verdict for f in manifest.falsifiers}}
