"""Multi-node pieces without workers (issue 19): the rendezvous the step hosts, the node's torchrun command,
the shared-storage checks (preflight and each node's probe), the stop of node runs through Prefect."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

import kd.preflight as preflight
from kd.config import load_config
from kd.train.distributed.launch import torchrun_command
from kd.train.distributed.nodes import Rendezvous, check_shared_storage
from kd.errors import ConfigError
from tests.conftest import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


def _cfg(tmp: Path, *extra: str):
    return load_config(SMOKE, ["train.distributed=ddp", "train.nproc_per_node=1", "train.rendezvous.nnodes=2",
                               "train.rank_timeout_s=45", f"work_dir={tmp / 'runs'}", f"evidence_dir={tmp / 'ev'}",
                               *extra])


def test_the_step_hosts_the_rendezvous_and_relays_rank_0(tmp_path):
    from torch.distributed import TCPStore

    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    with Rendezvous(cfg, run_dir, "r") as rdzv:
        host, port = rdzv.endpoint.rsplit(":", 1)
        assert host == "127.0.0.1" and rdzv.store_is_elsewhere and rdzv.id.startswith("r-")
        client = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))  # a node can reach it
        client.set("k", "v")
        assert rdzv.store.get("k") == b"v"
        params = rdzv.node_parameters(1)
        assert params["node_rank"] == 1 and params["endpoint"] == rdzv.endpoint
        check_shared_storage(cfg, run_dir, rdzv.id, rdzv.probe, 1)  # same host: sees the probes
        with pytest.raises(ConfigError, match="work_dir: node 1 .* does not see"):
            check_shared_storage(cfg, run_dir, rdzv.id, "another-step", 1)
        rdzv.events.write_text('{"kind": "step", "step": 1}\n{"kind": "st')  # a line still being written
        assert list(rdzv.new_events()) == [{"kind": "step", "step": 1}]
        with open(rdzv.events, "a") as f:
            f.write('ep", "step": 2}\n')
        assert list(rdzv.new_events()) == [{"kind": "step", "step": 2}]
    assert not list((run_dir / "launch").glob("probe-*")) and not list((tmp_path / "ev").glob(".kdflow-probe-*"))
    # a new attempt gets a new rendezvous id (a retry never meets the old state) and port
    with Rendezvous(cfg, run_dir, "r") as again:
        assert again.id != rdzv.id


def test_node_command_joins_the_handed_out_rendezvous(tmp_path):
    cfg = _cfg(tmp_path)
    cmd = torchrun_command(cfg, Path("s.json"), endpoint="127.0.0.1:4711", rdzv_id="run-1", store_is_elsewhere=True,
                           local_addr="127.0.0.1")
    arg = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert arg("--nnodes") == "2" and arg("--rdzv-endpoint") == "127.0.0.1:4711" and arg("--rdzv-id") == "run-1"
    assert arg("--rdzv-conf") == "join_timeout=45,is_host=false"  # a node that never arrives: fail in 45 s
    assert arg("--local-addr") == "127.0.0.1" and "--standalone" not in cmd


def test_preflight_says_where_storage_is_and_refuses_local_disks_across_hosts(tmp_path, monkeypatch):
    one = preflight.shared_storage(_cfg(tmp_path))
    assert all(c["ok"] for c in one["checks"]) and one["summary"].startswith("one host: same path")
    remote = _cfg(tmp_path, "train.rendezvous.host=10.0.0.5")
    monkeypatch.setattr(preflight, "_mount_of", lambda p: ("/", "ext4"))
    bad = preflight.shared_storage(remote)
    assert [c["ok"] for c in bad["checks"]] == [False, False]
    assert "work_dir" in bad["checks"][0]["detail"] and "local to this host" in bad["checks"][0]["detail"]
    monkeypatch.setattr(preflight, "_mount_of", lambda p: ("/mnt/shared", "nfs4"))
    good = preflight.shared_storage(remote)
    assert all(c["ok"] for c in good["checks"]) and "several hosts" in good["summary"]


def test_multi_node_needs_a_distributed_mode():
    with pytest.raises(ConfigError, match="train.rendezvous.nnodes=2 needs train.distributed"):
        load_config(SMOKE, ["train.rendezvous.nnodes=2"])


@pytest.mark.slow
def test_stopping_cancels_node_runs_and_forces_those_no_worker_answers(prefect_server, tmp_path):
    """A scheduled node run is cancelled at once; a running one whose worker is gone (nobody acts on
    Cancelling) is forced to Cancelled after the wait; a completed one is left as it is."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running, Scheduled

    from tasks.train import stop_node_runs

    @flow(name="e19-node-probe")
    def probe():
        return 1

    with get_client(sync_client=True) as client:
        runs = [client.create_flow_run(probe, name=f"n{i}") for i in range(3)]
        client.set_flow_run_state(runs[0].id, Scheduled(), force=True)  # as run_deployment leaves it
        client.set_flow_run_state(runs[1].id, Running(), force=True)
        client.set_flow_run_state(runs[2].id, Completed(), force=True)
    out = stop_node_runs(runs, "test stop", wait_s=1.0)
    assert out == {"n0": "Cancelled", "n1": "Cancelled (forced)", "n2": "Completed"}
    with get_client(sync_client=True) as client:
        states = [client.read_flow_run(r.id).state for r in runs]
    assert [s.type.value for s in states] == ["CANCELLED", "CANCELLED", "COMPLETED"]
    assert json.dumps(states[1].message).count("forced") == 1


def test_a_node_that_cannot_see_the_student_builds_a_from_teacher_student_itself(tiny_pair, tmp_path, monkeypatch):
    """A node whose filesystem lacks the pruned student's folder rebuilds it from the teacher's snapshot, with the
    content the run trained from (before the fix it called pull_model without the teacher: ConfigError)."""
    from flows.multinode import node_local_dir
    from kd.config import load_config
    from kd.hub import pull_model

    teacher_dir, _ = tiny_pair
    cfg = load_config("configs/smoke.yaml", [
        f"teacher.repo={teacher_dir}", "student.repo=from-teacher", "student.init.from_teacher.keep_layers=1",
        "student.init.from_teacher.strategy=even"])
    monkeypatch.setenv("KDFLOW_HOME", str(tmp_path / "flow-home"))
    teacher = pull_model(cfg.teacher, "teacher")
    student = pull_model(cfg.student, "student", teacher=teacher, data=cfg.data)
    monkeypatch.setenv("KDFLOW_HOME", str(tmp_path / "node-home"))  # this node's own cache: the folder is not here
    unseen = student.model_copy(update={"local_dir": str(tmp_path / "not-on-this-node")})
    here = node_local_dir(cfg, unseen, "student", teacher=teacher)
    assert here != student.local_dir and str(tmp_path / "node-home") in here
    assert (tmp_path / "not-on-this-node").exists() is False
