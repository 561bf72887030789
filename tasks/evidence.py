"""Task `write_evidence`: the evidence folder and its manifest. Never cached: each run writes its own."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kd.config import RunConfig
from kd.manifest import Manifest, write_evidence
from kd.results import (EvalReport, Falsifier, ModelSnapshot, PreflightReport, PreparedData, TrainResult,
                        VocabAlignment)


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
    run_dir = Path(config.evidence_dir) / run_name
    models = {k: v for k, v in (("teacher", teacher), ("student", student)) if v is not None}
    manifest = write_evidence(
        run_dir, config=config.model_copy(update={"name": run_name}), preflight=preflight, models=models,
        vocab=alignment, training=training, eval_report=evaluation, falsifiers=falsifiers,
        flow_run_id=flow_run_id, flow_run_url=flow_run_url, start=start, end=datetime.now(timezone.utc), data=prepared,
    )
    rows = "\n".join(f"| {f.id} | {f.claim} | {f.observed} | **{f.verdict}** |" for f in manifest.falsifiers)
    create_markdown_artifact(
        key="evidence-summary",
        markdown=f"# Run {run_name}: **{manifest.run.status.upper()}**\n\n"
        f"Evidence folder: `{run_dir.resolve()}`\n\n| falsifier | claim | observed | verdict |\n|---|---|---|---|\n"
        f"{rows}\n",
        description="Falsifier verdicts of this run",
    )
    create_link_artifact(key="evidence-folder", link=run_dir.resolve().as_uri(), link_text=str(run_dir),
                         description="This run's evidence folder: manifest.json and every file it hashes")
    return manifest
