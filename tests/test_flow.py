"""The whole DAG on a real Prefect server (SQLite, 127.0.0.1): six completed tasks, a verified manifest."""

import json

import pytest

from kd.config import load_config
from kd.errors import VocabError
from kd.manifest import verify_run_dir
from tests.conftest import smoke_overrides
from tests.prefect_helpers import artifacts, task_states

STEPS = ["preflight", "pull_models", "check_vocab", "train_student", "evaluate", "write_evidence"]


@pytest.mark.slow
def test_smoke_flow_end_to_end(prefect_server, tiny_pair, tmp_path):
    from flows.distill import distill

    cfg = load_config("configs/smoke.yaml", smoke_overrides(tmp_path, steps=8) + ["orchestration.refresh_cache=true"])
    state = distill(cfg, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["status"] == "pass" and result["falsifiers"]["F-DISTILL-SMOKE-001"] == "pass"

    states = task_states(state.state_details.flow_run_id)
    assert sorted(states) == sorted(STEPS) and set(states.values()) == {"Completed"}

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


@pytest.mark.slow
def test_hf_token_appears_nowhere(prefect_server, tiny_pair, tmp_path, monkeypatch):
    """A set HF_TOKEN is used by the hub client but never lands in evidence, logs or artifacts."""
    from flows.distill import distill

    token = "hf_kdflowTestSecret0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    cfg = load_config("configs/smoke.yaml", smoke_overrides(tmp_path) + ["orchestration.refresh_cache=true"])
    state = distill(cfg, return_state=True)
    assert state.is_completed(), state
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.name == "train.log" for p in written)
    assert not [p for p in written if token.encode() in p.read_bytes()]
    arts = artifacts(state.state_details.flow_run_id)
    assert len(arts) >= 8
    assert not [k for k, a in arts.items() if token in json.dumps(a.model_dump(mode="json"), default=str)]
