"""The whole DAG on a real Prefect server (SQLite, 127.0.0.1): six completed tasks, a verified manifest."""

import asyncio
import json

import pytest

from kd.config import load_config
from kd.errors import VocabError
from kd.manifest import verify_run_dir
from tests.conftest import smoke_overrides

STEPS = ["preflight", "pull_models", "check_vocab", "train_student", "evaluate", "write_evidence"]


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
def test_smoke_flow_end_to_end(prefect_server, tiny_pair, tmp_path):
    from flows.distill import distill

    cfg = load_config("configs/smoke.yaml", smoke_overrides(tmp_path, steps=8) + ["orchestration.refresh_cache=true"])
    state = distill(cfg, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["status"] == "pass" and result["falsifiers"]["F-DISTILL-SMOKE-001"] == "pass"

    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    by_name = {r.name.rsplit("-", 1)[0]: r for r in runs}
    assert sorted(by_name) == sorted(STEPS)
    assert all(r.state.is_completed() for r in runs)

    run_dir = tmp_path / "evidence" / result["run"]
    assert verify_run_dir(run_dir) == []
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["run"]["flow_run_id"] == str(state.state_details.flow_run_id)
    assert manifest["models"]["teacher"]["resolved_commit"] == "local"
    assert manifest["training"]["final_loss"] < manifest["training"]["initial_loss"]


@pytest.mark.slow
def test_vocab_failure_fails_the_run_and_leaves_fail_evidence(prefect_server, tiny_pair, tmp_path):
    """Swapping the roles (student larger than teacher) stops at the vocab check, with evidence saying so."""
    from flows.distill import distill

    teacher, student = tiny_pair
    cfg = load_config(None, [f"teacher.repo={student}", f"student.repo={teacher}"] + smoke_overrides(tmp_path))
    with pytest.raises(VocabError):
        distill(cfg)
    (run_dir,) = (tmp_path / "evidence").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["run"]["status"] == "fail"
    assert any(f["id"] == "F-DISTILL-COMPLETE-001" and f["verdict"] == "fail" for f in manifest["falsifiers"])
