"""Task `preflight`: never cached (it checks the machine as it is now); a failed check stops the run."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kd.config import RunConfig
from kd.preflight import format_plan, raise_if_failed, run_preflight
from kd.results import PreflightReport


@task(name="preflight", cache_policy=NO_CACHE, retries=0)
def preflight(config: RunConfig) -> PreflightReport:
    report = run_preflight(config)
    env_rows = "\n".join(
        f"| {k} | {v} |" for k, v in (("python", report.python), ("torch", report.torch),
                                      ("transformers", report.transformers), ("prefect", report.prefect),
                                      ("device", report.device), ("bf16", report.bf16_supported))
    )
    create_markdown_artifact(
        key="preflight-plan",
        markdown=f"# Preflight {'passed' if report.ok else 'FAILED'}\n\n```\n{format_plan(report)}\n```\n\n"
        f"| environment | value |\n|---|---|\n{env_rows}\n",
        description="Plan and environment checks of this distillation",
    )
    raise_if_failed(report)
    return report
