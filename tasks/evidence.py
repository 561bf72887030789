"""Task `write_evidence`: the evidence folder and its manifest. Never cached: each run writes its own.

The manifest's `lineage` says, per cached step, whether this run reused a cached result and which
run produced it: from the States the flow saw and the results' own provenance (tasks/lineage.py),
never from reading task states back from the server. When
`orchestration.evidence_signing_key_block` names an existing Prefect Secret block (an Ed25519
private key in PEM), the manifest is signed (manifest.sig, kd/evidence/signing.py):

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
from kd.evidence.manifest import Manifest, write_evidence
from tasks import artifacts
from kd.results import (BaselineEval, EvalReport, Falsifier, ModelSnapshot, PreflightReport, PreparedData, TeacherCacheResult,
                        TrainResult, VocabAlignment)
from tasks.lineage import step_lineage


@task(name="write_evidence", cache_policy=NO_CACHE, retries=1)
def write_evidence_task(
    config: RunConfig, run_name: str, start: datetime, preflight: PreflightReport | None,
    teacher: ModelSnapshot | None, student: ModelSnapshot | None, alignment: VocabAlignment | None,
    training: TrainResult | None, evaluation: EvalReport | None, failure: str | None = None,
    flow_run_id: str | None = None, flow_run_url: str | None = None, prepared: PreparedData | None = None,
    cached_steps: dict[str, bool] | None = None, teacher_cache: TeacherCacheResult | None = None,
    control: TrainResult | None = None, baselines: BaselineEval | None = None,
) -> Manifest:
    falsifiers = []
    if failure is not None:
        falsifiers.append(Falsifier(id="F-DISTILL-COMPLETE-001", claim="every step of the DAG completed",
                                    observed=failure[:2000], verdict="fail"))
    run_dir = Path(config.evidence_dir).expanduser().resolve() / run_name
    models = {k: v for k, v in (("teacher", teacher), ("student", student)) if v is not None}
    results = {"pull_models": (teacher, student), "check_vocab": alignment, "prepare_data": prepared,
               "cache_teacher_logits": teacher_cache or getattr(training, "teacher_cache", None),
               "train_student": training, "train_control": control, "evaluate_baselines": baselines,
               "evaluate": evaluation}
    lineage = step_lineage(cached_steps or {}, run_name, flow_run_id, results)
    manifest = write_evidence(
        run_dir, config=config.model_copy(update={"name": run_name}), preflight=preflight, models=models,
        vocab=alignment, training=training, eval_report=evaluation, falsifiers=falsifiers,
        flow_run_id=flow_run_id, flow_run_url=flow_run_url, start=start, end=datetime.now(timezone.utc), data=prepared,
        lineage=lineage,
    )
    signed = sign_with_secret_block(run_dir, config.orchestration.evidence_signing_key_block)
    # the run page: cached steps' artifacts rebuilt (naming their producer), loss curve, verdicts (also logged)
    artifacts.rebuild_cached(manifest.lineage, teacher=teacher, student=student, alignment=alignment,
                             training=training, evaluation=evaluation, prepared=prepared)
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


def sign_with_secret_block(run_dir: Path, block_name: str | None) -> str:
    """Sign the manifest with the Ed25519 key in Prefect Secret block `block_name`, when that
    block exists; returns a note for the summary artifact. No block configured: not signed."""
    if not block_name:
        return ""
    from prefect.blocks.system import Secret

    from kd.evidence.signing import fingerprint, load_private_key, sign_run
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
