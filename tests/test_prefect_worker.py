"""Production topology on the session's Prefect server: `cpu` and `gpu` process pools, the deployments of
prefect.yaml (deployed with `prefect deploy`), and one real `prefect worker start` per pool, started here
and stopped afterwards.

distill/manual runs on the cpu worker and delegates training to kd-train/gpu on the gpu worker through
run_deployment; the child completes, the parent finishes and its manifest verifies. A child that fails
fails its parent with the child's error. Invalid parameters are refused before any run exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow

from kd.config import load_config
from kd.errors import ConfigError
from kd.evidence.verify import verify_run_dir
from tests.conftest import REPO
from tests.prefect_helpers import SMOKE, api_url, flow_run, orch_overrides, stop_process, task_runs, task_states

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workers(prefect_server, tiny_pair, tmp_path_factory):
    """Pools + deployments + one process worker per pool; yields {pool: log path}. Workers stopped at the end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    tmp = tmp_path_factory.mktemp("workers")
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for pool, limit in (("cpu", None), ("gpu", 1)):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template,
                                                   concurrency_limit=limit), overwrite=True)
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "-n", "distill/manual", "-n", "kd-train/gpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    procs, logs = {}, {}
    try:
        for pool in ("cpu", "gpu"):
            logs[pool] = tmp / f"worker-{pool}.log"
            with open(logs[pool], "w") as log:
                procs[pool] = subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--install-policy", "never",
                     "--name", f"test-{pool}", "--limit", "1"],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield logs
    finally:
        codes = {pool: stop_process(p) for pool, p in procs.items()}
        assert all(p.poll() is not None for p in procs.values()), codes


def _logs(logs: dict) -> str:
    return "\n".join(f"--- worker {k} ---\n" + Path(v).read_text()[-3000:] for k, v in logs.items())


def _children(parent_id) -> list:
    """Flow runs started by run_deployment from inside the parent (linked through its dummy task run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

    ids = [r.id for r in task_runs(parent_id)]
    with get_client(sync_client=True) as client:
        link = FlowRunFilterParentTaskRunId(any_=ids)
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=link))


def test_distill_deployment_delegates_training_to_the_gpu_worker(workers, tmp_path):
    from prefect.deployments import run_deployment

    cfg = load_config(SMOKE, orch_overrides(tmp_path, "orchestration.train_deployment=kd-train/gpu",
                                            "orchestration.refresh_cache=true"))
    parent = run_deployment("distill/manual", parameters={"config": cfg.model_dump(mode="json")},
                            timeout=RUN_TIMEOUT_S, poll_interval=2)
    assert parent.state.is_completed(), f"{parent.state!r}\n{_logs(workers)}"
    parent = flow_run(parent.id)
    # the flow-run name template works from a deployment too (the worker starts it under a random name)
    assert re.fullmatch(r"distill-tiny-student-from-tiny-teacher-\d{8}-\d{6}", parent.name), parent.name
    assert parent.work_pool_name == "cpu"

    (child,) = _children(parent.id)
    assert child.state.is_completed() and child.work_pool_name == "gpu"
    assert child.name == f"train-{parent.name}"
    assert task_states(child.id) == {"train_student": "Completed"}  # trained there, not served from a cache
    assert "train_student" not in task_states(parent.id)
    (link,) = [r for r in task_runs(parent.id) if r.task_key.endswith("run_deployment.kd-train-gpu")]
    assert link.id == child.parent_task_run_id and link.state.is_completed()  # the subflow link the UI draws

    run_dir = tmp_path / "evidence" / parent.name
    assert verify_run_dir(run_dir) == []
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["run"]["status"] == "pass"
    assert manifest["training"]["checkpoint_dir"].startswith(str(tmp_path / "runs" / parent.name))
    # the child's TrainResult was persisted to the configured result storage and read back by the parent
    storage_key = child.state.data.storage_key if hasattr(child.state.data, "storage_key") else None
    assert storage_key and Path(storage_key).is_relative_to(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])


@flow(name="delegate-probe")
def _delegate(config, teacher, student, alignment, run_name: str):
    from flows.train import train_via_deployment

    return train_via_deployment(config, teacher, student, alignment, run_name)


def test_failed_child_fails_the_parent_with_its_error(workers, tmp_path):
    """The child raises ConfigError (a resume_from that is no checkpoint): not retried there, and the parent
    re-raises it naming the child run, so `kdflow run` still exits 2."""
    from kd.hub import pull_model
    from kd.vocab import align_vocab

    cfg = load_config(SMOKE, orch_overrides(tmp_path, "orchestration.train_deployment=kd-train/gpu",
                                            f"train.resume_from={tmp_path / 'no-such-checkpoint'}"))
    teacher, student = pull_model(cfg.teacher, "teacher"), pull_model(cfg.student, "student")
    alignment = align_vocab(teacher.local_dir, student.local_dir)
    state = _delegate(cfg, teacher, student, alignment, "probe", return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError) as err:
        state.result()
    msg = str(err.value)
    assert "kd-train/gpu" in msg and "train-probe" in msg and "train.resume_from" in msg, msg

    (child,) = _children(state.state_details.flow_run_id)
    assert child.state.is_failed()
    (train,) = task_runs(child.id)
    assert train.state.is_failed() and train.run_count == 1  # a validation error is not retried


def test_deployment_refuses_invalid_parameters_before_a_run_exists(workers):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("distill/manual")
        assert dep.enforce_parameter_schema
        before = client.count_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        bad = {"config": {"teacher": {"repo": "tiny:teacher"}, "student": {"repo": "tiny:student"}, "kd": {"alpha": 2}}}
        with pytest.raises(Exception, match="(?i)validation"):
            client.create_flow_run_from_deployment(dep.id, parameters=bad)
        after = client.count_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    assert after == before
