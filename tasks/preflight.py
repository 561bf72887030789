"""Task `preflight`: never cached (it checks the machine as it is now); a failed check stops the run."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from kd.config import RunConfig
from kd.preflight import format_plan, raise_if_failed, run_preflight
from kd.results import PreflightReport


@task(name="preflight", cache_policy=NO_CACHE, retries=0)
def preflight(config: RunConfig) -> PreflightReport:
    report = run_preflight(config)
    name = flow_run.name or config.name
    plan = format_plan(report)
    if name:  # the plan is written before the run has a name; in a flow run it has one
        plan = plan.replace("<run name>", name)
    log = get_run_logger()  # the run's Logs tab: the plan, then each check that did not pass
    log.info("preflight %s\n%s", "passed" if report.ok else "FAILED", plan)
    for c in report.checks:
        if not c.get("ok", True):
            log.warning("preflight check %s: %s", c.get("name"), c.get("detail"))
    env_rows = "\n".join(
        f"| {k} | {v} |" for k, v in (("python", report.python), ("torch", report.torch),
                                      ("transformers", report.transformers), ("prefect", report.prefect),
                                      ("device", report.device), ("bf16", report.bf16_supported))
    )
    create_markdown_artifact(
        key="preflight-plan",
        markdown=f"# Preflight {'passed' if report.ok else 'FAILED'}\n\n```\n{plan}\n```\n\n"
        f"| environment | value |\n|---|---|\n{env_rows}\n",
        description="Plan and environment checks of this distillation",
    )
    raise_if_failed(report)
    return report
