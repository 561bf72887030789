"""The `sweep` flow: one base run, many trials, each a child `distill` flow run, ranked on one page.

    kdflow sweep configs/sweeps/smoke-alpha-temperature.yaml

1. The spec is expanded and every trial validated and preflighted (kd/sweep/spec.py) before anything runs.
2. Shared steps run once, in this flow, before any trial: pull, vocab check, prepared data and (offline
   teacher) the teacher cache, once per distinct set of inputs they depend on (e.g. once per
   temperature: the cache stores temperature-scaled log-probs). Computing them here rather than in the
   first trial means concurrent trials never race to build the same cache; every trial then finds
   them `Cached` in its own flow run.
3. Each trial is a `sweep_trial` task that calls the `distill` flow: a real child flow run (a subflow
   of the sweep, named after the trial, with its own evidence folder in evidence/<sweep>/<trial>/).
   The tasks run on a thread pool of `spec.concurrency` workers, so at most that many trials run at
   once; training inside them still takes one slot of the `orchestration.gpu_slots` global
   concurrency limit each (one training per GPU). Subflows rather than run_deployment: they need no
   worker (`kdflow sweep` works on a laptop exactly like `kdflow run`), still show as child flow runs
   in the UI, and the thread pool bounds them.
4. A failed trial does not stop the others; the sweep then fails naming it. A trial's task is cached
   on its whole config and only while its evidence folder still verifies: rerunning the sweep shows
   finished trials `Cached` (no child run) and runs only the failed or missing ones (an earlier
   failed attempt's folders are moved to `.attempts/`).
5. The sweep page: a markdown artifact with the table sorted by the objective, the objective-vs-cost
   plot and the best trial; `evidence/<sweep>/sweep.json` records each trial's manifest sha256, the
   ranking and the best trial (`kdflow evidence verify evidence/<sweep>` rechecks all of it).
"""

from __future__ import annotations

import base64
import contextvars
import shutil
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.teacher_cache import cache_step
from kd.config import RunConfig
from kd.hashing import sha256_file
from kd.evidence.manifest import MANIFEST
from kd.evidence.redact import redact
from kd.sweep.report import ATTEMPTS, PLOT, summary_markdown, trial_row, write_sweep
from kd.sweep.spec import SweepSpec, Trial, expand, metric_path, preflight_trials, shared_groups, sweep_dir
from tasks.policy import content_key, fresh_key
from kd.evaluate.control import control_config
from tasks.evaluate import evaluate_baselines
from tasks.prepare import prepare_data_task
from tasks.pull import pull_models
from tasks.train import train_student_task
from tasks.vocab import check_vocab


class SweepFailed(RuntimeError):
    """At least one trial did not pass; the message names them."""


class TrialFailed(RuntimeError):
    """The trial's distill run did not complete (it failed its gates or a step)."""


# ---------------------------------------------------------------- one trial
def _trial_evidence(cfg: RunConfig) -> Path:
    return Path(cfg.evidence_dir).expanduser().resolve() / str(cfg.name)


def _finished(cfg: RunConfig) -> bool:
    """The trial's evidence folder exists for exactly this config, passed, and verifies."""
    import json

    from kd.evidence.verify import verify_run_dir

    tdir = _trial_evidence(cfg)
    try:
        m = json.loads((tdir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = m.get("config") == redact(cfg.model_dump(mode="json"))
    return same and (m.get("run") or {}).get("status") == "pass" and not verify_run_dir(tdir)


def _stale(result: dict) -> list[str]:
    """Why a cached trial result cannot be reused: its evidence folder is gone, changed or fails verify."""
    from kd.evidence.verify import verify_run_dir

    tdir = Path(result["evidence"])
    if not (tdir / MANIFEST).is_file():
        return [f"evidence folder {tdir} is gone"]
    if sha256_file(tdir / MANIFEST) != result["manifest_sha256"]:
        return [f"{tdir / MANIFEST} changed since the trial wrote it"]
    return [f"{tdir}: {p}" for p in verify_run_dir(tdir)][:3]


def _trial_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    return fresh_key(context, content_key("sweep-trial", cfg.model_dump(mode="json")), _stale, "sweep_trial")


def _set_aside(cfg: RunConfig) -> list[str]:
    """Move an earlier attempt's evidence and work folders to <sweep>/.attempts/ (a run folder is never
    reused, and the attempt stays on disk to look at); returns where they went."""
    moved = []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    for root in (cfg.evidence_dir, cfg.work_dir):
        src = Path(root).expanduser().resolve() / str(cfg.name)
        if src.is_dir() and any(src.iterdir()):
            dst = src.parent / ATTEMPTS / f"{cfg.name}-{stamp}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            moved.append(str(dst))
    return moved


def _outside_transaction(distill, config: RunConfig):
    """Run the child flow outside this task's transaction. Inside it, the child's tasks would join it: their
    cache records written only when the trial task commits, and a failed trial rolling them all back (their
    states become RolledBack and the failed child's run page loses its tasks). Called in a copied context,
    so clearing the transaction here does not touch the trial task's own."""
    from prefect.transactions import Transaction

    Transaction.__var__.set(None)
    return distill(config, return_state=True)


def _trial_run_name() -> str:
    return f"trial-{task_run.parameters['config'].name}"


@task(name="sweep_trial", task_run_name=_trial_run_name, cache_key_fn=_trial_key, persist_result=True)
def run_trial(config: RunConfig) -> dict:
    """Run one trial as a child `distill` flow run (or reuse its verified evidence); fail if it fails."""
    from flows.distill import distill

    log = get_run_logger()
    tdir = _trial_evidence(config)
    if not config.orchestration.refresh_cache and _finished(config):  # verified evidence; Prefect's cache forgot it
        log.info("trial %s: reusing its verified evidence %s", config.name, tdir)
        return {"name": config.name, "evidence": str(tdir), "manifest_sha256": sha256_file(tdir / MANIFEST),
                "reused": True}
    for moved in _set_aside(config):
        log.warning("trial %s: an earlier attempt's folder was moved to %s", config.name, moved)
    state = contextvars.copy_context().run(_outside_transaction, distill, config)
    if not state.is_completed():
        raise TrialFailed(f"trial {config.name}: distill run ended {state.name}: {state.message}")
    return {"name": config.name, "evidence": str(tdir), "manifest_sha256": sha256_file(tdir / MANIFEST),
            "reused": False}


# ---------------------------------------------------------------- shared steps, once
def run_shared_steps(trials: list[Trial], sweep_name: str) -> None:
    """Pull, vocab check, prepared data, (offline) the teacher cache, the teacher's and student-before's eval
    and (eval.control) the fine-tuning control, once per group of trials that share their inputs, so every
    trial finds them Cached: 4 trials score the teacher once, not 4 times."""
    for group in shared_groups(trials):
        cfg = group[0].config
        o = cfg.orchestration
        opts = dict(refresh_cache=o.refresh_cache or None, retries=o.retries, retry_delay_seconds=o.retry_delay_s)
        teacher, student = pull_models.with_options(**opts)(cfg)
        alignment = check_vocab.with_options(refresh_cache=o.refresh_cache or None)(cfg, teacher, student)
        prepared = prepare_data_task.with_options(**opts)(cfg, student, teacher)
        if cfg.kd.teacher_mode == "offline":
            cache_step(cfg, teacher, alignment, prepared, f"{sweep_name}-shared", **opts)
        for trial in group:  # one computation per distinct key: the rest of the group's calls are Cached
            evaluate_baselines.with_options(refresh_cache=o.refresh_cache or None)(
                trial.config, teacher, student, alignment, prepared)
            if trial.config.eval.control:  # a folder per distinct control (e.g. per lr): never resume another's
                ctl = control_config(trial.config)
                tag = content_key("control", ctl.train.model_dump(mode="json"), ctl.kd.model_dump(mode="json"))[-10:]
                train_student_task.with_options(name="train_control", **opts)(
                    ctl, teacher, student, alignment, f"{sweep_name}-shared", prepared,
                    folder=f"{sweep_name}-shared-control-{tag}")


# ---------------------------------------------------------------- before trials start in threads
def prepare_threads(trials: list[Trial]) -> None:
    """What concurrent trials must not race on, done once here: transformers resolves its names lazily and two
    threads resolving the same one at once can fail (`cannot import name 'AutoConfig'`), and two trials creating
    the missing GPU-slot limit at once collide on the server. (Model builds hold kd.model_build_lock.)"""
    import transformers

    from tasks.slots import ensure_limit

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerFast",
                 "GenerationConfig", "LogitsProcessorList"):
        getattr(transformers, name)
    import flows.distill  # noqa: F401  (and the task modules it imports)

    for slots in sorted({t.config.orchestration.gpu_slots for t in trials}):
        ensure_limit(slots)


# ---------------------------------------------------------------- the flow
def _sweep_run_name() -> str:
    spec = flow_run.parameters["spec"]
    return f"sweep-{spec.name if isinstance(spec, SweepSpec) else spec['name']}"


@flow(name="sweep", flow_run_name=_sweep_run_name, log_prints=True, validate_parameters=True)
def sweep(spec: SweepSpec) -> dict:
    """Run every trial of `spec` as a child distill run, at most spec.concurrency at once; rank them."""
    trials = expand(spec)  # ConfigError (exit 2) before any work
    preflight_trials(trials)  # every trial's own config, not one per shared group: a bad trial fails the sweep now
    log = get_run_logger()
    start = datetime.now(timezone.utc)
    out_dir = sweep_dir(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("sweep %s: %d trials, %d at once; evidence in %s", spec.name, len(trials), spec.concurrency, out_dir)
    run_shared_steps(trials, spec.name)
    prepare_threads(trials)

    with ThreadPoolTaskRunner(max_workers=spec.concurrency) as runner:
        futures = [runner.submit(run_trial.with_options(refresh_cache=t.config.orchestration.refresh_cache or None),
                                 parameters={"config": t.config}) for t in trials]
        states = [f.wait() or f.state for f in futures]

    metric = metric_path(spec.objective.metric)
    rows = []
    for t, state in zip(trials, states):
        row = trial_row(out_dir / t.name, t.name, t.overrides, metric)
        result = state.result(raise_on_failure=False) if state.is_completed() else None
        row["reused"] = state.name == "Cached" or bool(isinstance(result, dict) and result.get("reused"))
        row["trial_state"] = state.name
        if not state.is_completed() and row["status"] == "pass":  # e.g. crashed after writing evidence
            row["status"] = "fail"
        rows.append(row)
    end = datetime.now(timezone.utc)
    doc = write_sweep(out_dir, name=spec.name, spec=spec.model_dump(mode="json"), metric=metric,
                      direction=spec.objective.direction, rows=rows,
                      flow_run_id=str(flow_run.id) if flow_run.id else None, flow_run_url=flow_run.ui_url,
                      start=start.isoformat(), end=end.isoformat(),
                      extra={"wall_s": (end - start).total_seconds(),
                             "reused": [r["name"] for r in rows if r["reused"]]})
    png = base64.b64encode((out_dir / PLOT).read_bytes()).decode()
    create_markdown_artifact(
        key="sweep-summary", description=f"Sweep {spec.name}: trials ranked by {metric} ({spec.objective.direction})",
        markdown=summary_markdown(spec.name, metric, spec.objective.direction, rows, doc["ranking"],
                                  f"data:image/png;base64,{png}", out_dir))
    create_link_artifact(key="sweep-folder", link=out_dir.as_uri(), link_text=str(out_dir),
                         description="The sweep folder: sweep.json, objective_vs_cost.png, one evidence folder "
                         "per trial")
    log.info("sweep %s: best trial %s; ranking %s", spec.name, doc["best"], ", ".join(doc["ranking"]))
    if doc["failed"]:
        raise SweepFailed(f"sweep {spec.name}: {len(doc['failed'])} of {len(rows)} trials failed: "
                          f"{', '.join(doc['failed'])} (evidence in {out_dir})")
    return {"sweep": spec.name, "status": doc["status"], "best": doc["best"], "ranking": doc["ranking"],
            "evidence": str(out_dir), "reused": doc["reused"], "wall_s": doc["wall_s"]}
