"""The whole DAG on a real Prefect server (SQLite, 127.0.0.1): six completed tasks, a verified manifest."""

import json

import pytest

from kd.config import load_config
from kd.errors import VocabError
from kd.evidence.verify import verify_run_dir
from tests.conftest import smoke_overrides
from tests.prefect_helpers import artifacts, task_states

STEPS = ["preflight", "pull_models", "check_vocab", "prepare_data", "train_student", "evaluate_baselines", "evaluate",
         "write_evidence"]


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


SECRETS = {  # issue 9.2: every one is set for a real `kdflow smoke`; none may be written anywhere
    "HF_TOKEN": "hf_kdflowTestSecret0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_kdflowLegacyHubToken98765",
    "PREFECT_API_KEY": "pnu_kdflowPrefectApiKey424242",
    "PREFECT_API_AUTH_STRING": "admin:kdflowAuthStringPw31337",
    "WANDB_API_KEY": "wandb0123456789abcdefkdflowsecret",
    "AWS_SECRET_ACCESS_KEY": "awsKdflowSecretAccessKey/0123456789",
    "HF_ENDPOINT": "https://kduser:kdUrlPassw0rd77@hub.invalid",  # credentials inside a URL
}
NEEDLES = [v for k, v in SECRETS.items() if k != "HF_ENDPOINT"] + ["kdUrlPassw0rd77", "kduser:kdUrl"]


@pytest.mark.slow
def test_secrets_appear_nowhere(prefect_server, tiny_pair, tmp_path):
    """Secrets set for the real `kdflow smoke` CLI appear in no file of the run, work and Prefect folders
    (PREFECT_HOME with its result storage), no artifact, no flow-run log line, not in stdout/stderr."""
    import os
    import subprocess
    import sys
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from tests.prefect_helpers import api_url

    home = tmp_path / "prefect-home"
    env = {**os.environ, **SECRETS, "PREFECT_API_URL": api_url(), "PREFECT_HOME": str(home),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "storage")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "smoke", "--steps", "6", "--no-cache", "--evidence-dir", str(tmp_path / "ev"),
         "--set", f"work_dir={tmp_path / 'runs'}", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1",
         "--set", "eval.require_kl_improvement=false"],  # about secrets in the evidence, not learning
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "ev").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["environment"]["env"]["HF_ENDPOINT"] == "https://***@hub.invalid"  # allowlisted, scrubbed
    assert not set(SECRETS) - {"HF_ENDPOINT"} & set(manifest["environment"]["env"])  # not allowlisted at all
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "train.log" for p in written) and any(p.parent.name == "storage" for p in written)
    for needle in NEEDLES:
        assert needle not in proc.stdout + proc.stderr
        assert not [p for p in written if needle.encode() in p.read_bytes()], needle
    flow_run_id = manifest["run"]["flow_run_id"]
    arts = artifacts(flow_run_id)
    assert len(arts) >= 8
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))
    assert logs
    seen = json.dumps([a.model_dump(mode="json") for a in arts.values()], default=str) + \
        json.dumps([log.message for log in logs])
    assert not [n for n in NEEDLES if n in seen]
