"""Shared by the tests/test_prefect_*.py modules: a quick orchestration config and API read-backs.

Everything is read back from the Prefect server with the client (what the UI shows), never from
in-process state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from uuid import UUID

from tests.conftest import REPO, smoke_overrides

SMOKE = REPO / "configs" / "smoke.yaml"


def orch_overrides(tmp: Path, *extra: str) -> list[str]:
    """Smoke preset, 6 steps, a checkpoint every 3. These tests are about orchestration, not learning:
    the KL gate is off (conftest.NOT_ABOUT_LEARNING); the other gates (finite, not collapsed, better than
    uniform, probe loss lowered) still pass by wide margins, measured in bench/results/gate_margins-*.json."""
    return smoke_overrides(tmp, steps=6) + ["train.lr=1e-3", *extra]


def task_runs(flow_run_id: UUID | str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))


def task_states(flow_run_id: UUID | str) -> dict[str, str]:
    """{task name (without the run suffix): state name}, e.g. {"train_student": "Cached"}."""
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in task_runs(flow_run_id)}


def task_run(flow_run_id: UUID | str, name: str):
    (run,) = [r for r in task_runs(flow_run_id) if r.name.rsplit("-", 1)[0] == name]
    return run


def flow_run(flow_run_id: UUID | str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(str(flow_run_id)))


def flow_run_by_name(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return run


def artifacts(flow_run_id: UUID | str) -> dict[str, object]:
    """{artifact key: artifact} created by the flow run's tasks (latest version of each key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))])))
    out = {}
    for a in sorted(found, key=lambda a: a.created):
        out[a.key] = a
    return out


def concurrency_limit(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "no Prefect server: use the prefect_server fixture"
    return url


def stop_process(proc: subprocess.Popen, first_wait_s: float = 3.0) -> int:
    """SIGTERM the process group; an idle `prefect worker start` ignores the first, so send a second;
    SIGKILL as a last resort. Returns the exit code."""
    for sig, wait in ((signal.SIGTERM, first_wait_s), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    return proc.wait(timeout=10)
