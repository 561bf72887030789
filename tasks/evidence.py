"""Task `write_evidence`: the evidence folder and its manifest. Never cached: each run writes its own.

The manifest's `lineage` says, per cached step, whether this run reused a cached result and which
run produced it (task states read back from the server; results carry their producer). When
`orchestration.evidence_signing_key_block` names an existing Prefect Secret block (an Ed25519
private key in PEM), the manifest is signed (manifest.sig, kd/signing.py):

    kdflow evidence keygen keys/nightly.pem
    python -c "from prefect.blocks.system import Secret; \
               Secret(value=open('keys/nightly.pem').read()).save('kdflow-evidence-key')"
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.logging import get_run_logger
from prefect.cache_policies import NO_CACHE

from kd.config import RunConfig
from kd.manifest import Manifest, write_evidence
from tasks import artifacts
from kd.results import (EvalReport, Falsifier, ModelSnapshot, PreflightReport, PreparedData, StepLineage,
                        TrainResult, VocabAlignment)

CACHED_STEPS = ("pull_models", "check_vocab", "prepare_data", "cache_teacher_logits", "train_student", "evaluate")


@task(name="write_evidence", cache_policy=NO_CACHE, retries=1)
def write_evidence_task(
    config: RunConfig, run_name: str, start: datetime, preflight: PreflightReport | None,
    teacher: ModelSnapshot | None, student: ModelSnapshot | None, alignment: VocabAlignment | None,
    training: TrainResult | None, evaluation: EvalReport | None, failure: str | None = None,
    flow_run_id: str | None = None, flow_run_url: str | None = None, prepared: PreparedData | None = None,
) -> Manifest:
    falsifiers = []
    if failure is not None:
        falsifiers.append(Falsifier(id="F-DISTILL-COMPLETE-001", claim="every step of the DAG completed",
                                    observed=failure[:2000], verdict="fail"))
    run_dir = Path(config.evidence_dir).expanduser().resolve() / run_name
    models = {k: v for k, v in (("teacher", teacher), ("student", student)) if v is not None}
    lineage = step_lineage(flow_run_id, run_name, {"train_student": training, "evaluate": evaluation,
                                                   "cache_teacher_logits": getattr(training, "teacher_cache", None)})
    manifest = write_evidence(
        run_dir, config=config.model_copy(update={"name": run_name}), preflight=preflight, models=models,
        vocab=alignment, training=training, eval_report=evaluation, falsifiers=falsifiers,
        flow_run_id=flow_run_id, flow_run_url=flow_run_url, start=start, end=datetime.now(timezone.utc), data=prepared,
        lineage=lineage,
    )
    signed = sign_with_secret_block(run_dir, config.orchestration.evidence_signing_key_block)
    # the run page: cached steps' artifacts rebuilt (naming their producer), loss curve, verdicts (also logged)
    artifacts.rebuild_cached(manifest.lineage, teacher=teacher, student=student, alignment=alignment,
                             training=training, evaluation=evaluation, prepared=prepared, flow_run_id=flow_run_id)
    trained = manifest.lineage.get("train_student")
    artifacts.loss_curve(run_dir, training.metrics_path if training else None, run_name,
                         trained.produced_by_run if trained is not None and trained.cached else None)
    artifacts.evidence_summary(manifest, run_name, run_dir, signed)
    log = get_run_logger()
    for f in manifest.falsifiers:
        (log.info if f.verdict == "pass" else log.warning)("%s %s: %s (%s)", f.verdict.upper(), f.id, f.claim,
                                                           f.observed[:300])
    log.info("run %s: %s; evidence %s", run_name, manifest.run.status.upper(), run_dir)
    create_link_artifact(key="evidence-folder", link=run_dir.resolve().as_uri(), link_text=str(run_dir),
                         description="This run's evidence folder: manifest.json and every file it hashes")
    return manifest


def step_lineage(flow_run_id: str | None, run_name: str, results: dict) -> dict[str, StepLineage]:
    """{step: StepLineage} for the cached steps this flow run ran: `cached` from the task run's
    state on the server (a child training flow's result says who produced it instead)."""
    from tasks.policy import STALE_REASONS

    states: dict[str, str] = {}
    if flow_run_id:
        try:
            from uuid import UUID

            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            with get_client(sync_client=True) as client:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
            for r in sorted(runs, key=lambda r: r.expected_start_time or r.created):
                states[r.name.rsplit("-", 1)[0]] = r.state.name if r.state else "?"
        except Exception:  # no server (a unit test): the results' own provenance still answers
            states = {}
    out: dict[str, StepLineage] = {}
    for step in CACHED_STEPS:
        result = results.get(step)
        prov = getattr(result, "produced_by", None)
        if step not in states and prov is None:
            continue
        cached = states[step] == "Cached" if step in states else prov.run_name != run_name
        out[step] = StepLineage(
            cached=cached,
            produced_by_run=prov.run_name if prov else (None if cached else run_name),
            flow_run_id=prov.flow_run_id if prov else (None if cached else flow_run_id),
            rerun_reason=STALE_REASONS.pop((str(flow_run_id), step), None),
        )
    return out


def sign_with_secret_block(run_dir: Path, block_name: str | None) -> str:
    """Sign the manifest with the Ed25519 key in Prefect Secret block `block_name`, when that
    block exists; returns a note for the summary artifact. No block configured: not signed."""
    if not block_name:
        return ""
    from prefect.blocks.system import Secret

    from kd.signing import fingerprint, load_private_key, sign_run
    from tasks.policy import warn_in_run

    try:
        pem = Secret.load(block_name).get()
    except ValueError:  # Prefect: "Unable to find block document named ..."
        warn_in_run(f"evidence not signed: no Prefect Secret block named {block_name!r}")
        return f" (not signed: no Secret block `{block_name}`)"
    pem = pem if isinstance(pem, str) else str(pem)
    sign_run(run_dir, pem)
    fp = fingerprint(load_private_key(pem).public_key())
    return f" (signed: `manifest.sig`, key {fp[:16]}…)"
