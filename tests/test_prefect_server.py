"""`make up` on a real server, as its users meet it: the nightly is scheduled, bad parameters are refused
before a run exists, and a failed nightly reaches a person through the webhook.

One stack for the module: `deploy/local.sh up` (what `make up` runs) on a free 127.0.0.1 port, a
temporary PREFECT_HOME (SQLite), the scheduler looping every second, the alert webhook pointed at a
receiver this module starts on 127.0.0.1, and no workers (KDFLOW_UP_WORKERS=0: runs that must execute
here are executed in-process, against that server, the way a worker's engine does).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import pytest

from flows.health import tracebacks
from tests.conftest import REPO
from tests.schema_cases import SMOKE, constrained_fields, with_value

pytestmark = pytest.mark.slow

NIGHTLY, MANUAL = "distill/nightly-smoke", "distill/manual"


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/kdflow-alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout_s: float) -> list:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        return list(self.received)


@dataclass
class Stack:
    api: str
    up: subprocess.CompletedProcess
    server_log: Path
    receiver: Receiver
    tmp: Path
    deployments: dict = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_pair):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("make-up")
    receiver = Receiver()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(KDFLOW_PREFECT_PORT=str(port), KDFLOW_UP_DIR=str(tmp / "up"), PREFECT_HOME=str(tmp / "home"),
               PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp / "results"), KDFLOW_UP_WORKERS="0",
               KDFLOW_ALERT_WEBHOOK_URL=receiver.url, KDFLOW_UP_WAIT_S="30",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1", PREFECT_SERVER_UI_ENABLED="false",
               KDFLOW_BIN=str(Path(sys.executable).parent))
    up = subprocess.run(["bash", str(REPO / "deploy" / "local.sh"), "up"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
    api = f"http://127.0.0.1:{port}/api"
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            s = Stack(api, up, tmp / "up" / "server.log", receiver, tmp)
            if up.returncode == 0:
                with get_client(sync_client=True) as client:
                    s.deployments = {n: client.read_deployment_by_name(n) for n in (NIGHTLY, MANUAL)}
            yield s
    finally:
        subprocess.run(["bash", str(REPO / "deploy" / "local.sh"), "down"], env=env, timeout=120,
                       capture_output=True)
        receiver.server.shutdown()


def _up_ok(stack: Stack) -> None:
    assert stack.up.returncode == 0, f"make up failed:\n{stack.up.stdout[-3000:]}\n{stack.up.stderr[-3000:]}"


def _flow_runs(deployment) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))


def test_make_up_schedules_the_nightly_and_says_when(stack):
    """The failure this is for: a cron shown in the UI whose scheduler fails on every pass."""
    _up_ok(stack)
    scheduled = [r for r in _flow_runs(stack.deployments[NIGHTLY]) if r.state.type.value == "SCHEDULED"]
    assert scheduled, "the scheduler created no run for distill/nightly-smoke"
    first = min(r.next_scheduled_start_time for r in scheduled)
    assert (first.hour, first.minute) == (2, 0) and first.timestamp() > time.time()
    assert f"next {NIGHTLY} run: {first.isoformat()}" in stack.up.stdout  # make up prints the next run
    assert "automation 'kdflow: nightly-smoke failed'" in stack.up.stdout
    time.sleep(2)  # two more scheduler passes
    assert tracebacks(stack.server_log.read_text()) == []


def test_make_up_check_fails_loudly_on_a_server_traceback(stack, tmp_path):
    """The check `make up` runs (flows.health) on a server log holding the scheduler error from the issue."""
    _up_ok(stack)
    log = tmp_path / "server.log"
    log.write_text(stack.server_log.read_text() + (
        "12:00:00.000 | ERROR   | prefect.server.services.scheduler - Unexpected error in: InvalidRequestError\n"
        "Traceback (most recent call last):\n"
        '  File "prefect/server/models/deployments.py", line 1, in _insert_scheduled_flow_runs\n'
        "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement\n"))
    env = {**os.environ, "PREFECT_API_URL": stack.api}
    out = subprocess.run([sys.executable, "-m", "flows.health", "--server-log", str(log), "--wait", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "traceback" in out.stderr and "Can't evaluate bulk DML statement" in out.stderr


def _post_run(stack: Stack, deployment, config: dict):
    import httpx

    return httpx.post(f"{stack.api}/deployments/{deployment.id}/create_flow_run",
                      json={"parameters": {"config": config}, "state": {"type": "PENDING"}}, timeout=30)


def test_server_refuses_a_bad_value_for_every_constrained_field(stack):
    """Through the API the UI form uses: each bad value gets HTTP 409/422 and no flow run is created."""
    _up_ok(stack)
    manual = stack.deployments[MANUAL]
    cases = constrained_fields()
    assert len(cases) >= 40 and {p for p, _, _ in cases} >= {"kd.temperature", "kd.alpha", "train.lr", "teacher.repo"}
    accepted = []
    for path, rule, value in cases:
        r = _post_run(stack, manual, with_value(path, value))
        if r.status_code not in (409, 422):
            accepted.append(f"{path}={value!r} ({rule}): HTTP {r.status_code}")
    assert accepted == []
    assert _flow_runs(manual) == []  # nothing was created
    ok = _post_run(stack, manual, SMOKE)  # the control: the same request with the preset is accepted
    assert ok.status_code == 201, ok.text
    assert [r.id for r in _flow_runs(manual)] == [UUID(ok.json()["id"])]


def _run_in_process(deployment, config: dict, stack: Stack):
    """Create a run of `deployment` and execute it here, as a worker's engine would."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    from flows.distill import distill

    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"config": config}, state=Pending())
    state = run_flow(distill, flow_run=run, parameters={"config": config}, return_type="state")
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run.id), state


def test_failed_nightly_posts_one_message_naming_run_and_falsifiers(stack):
    """A forced nightly failure (the smoke preset, 2 steps at lr 3: the loss rises, gates fail) delivers
    ONE Slack/Teams-style message naming the run and its failed falsifiers."""
    _up_ok(stack)
    cfg = with_value("train", {**SMOKE["train"], "steps": 2, "lr": 3.0, "warmup_steps": 0, "checkpoint_every": 0})
    cfg.update(evidence_dir=str(stack.tmp / "evidence"), work_dir=str(stack.tmp / "runs"),
               orchestration={"refresh_cache": True, "retries": 0,
                              # its own slot name: an in-process run under temporary_settings may take the
                              # slot on the session's test server too, which the worker tests then wait on
                              "gpu_slots": "gpu-alerts-test"})
    run, state = _run_in_process(stack.deployments[NIGHTLY], cfg, stack)
    assert state.is_failed(), state
    manifest = json.loads((stack.tmp / "evidence" / run.name / "manifest.json").read_text())
    failed = [f["id"] for f in manifest["falsifiers"] if f["verdict"] == "fail"]
    assert failed

    stack.receiver.wait_for(1, timeout_s=60)  # the automations service reacts within seconds; slack for a busy machine
    time.sleep(3)  # a second message would come now
    messages = list(stack.receiver.received)
    assert len(messages) == 1, messages
    (message,) = messages
    assert set(message) == {"text"}  # Slack and Teams incoming webhooks take {"text": ...}
    assert run.name in message["text"] and "FAILED" in message["text"]
    assert all(f in message["text"] for f in failed), (failed, message["text"])
    assert str(run.id) in message["text"]  # the link to the run page


def test_a_run_refused_before_starting_is_named_like_every_run(stack):
    """warmup_steps > steps passes the schema (a rule between two fields) and is refused by the flow's
    parameter validation: that run still gets a kdflow name, not a random one."""
    _up_ok(stack)
    cfg = with_value("train.warmup_steps", 1000)
    run, state = _run_in_process(stack.deployments[MANUAL], cfg, stack)
    assert state.is_failed() and "warmup_steps" in (state.message or "")
    assert run.name.startswith("distill-tiny-student-from-tiny-teacher-"), run.name
