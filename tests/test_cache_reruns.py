"""Issue 9.7-9.11: caches and reruns. Cached results hold absolute paths; a cache hit whose files
are gone runs the step again (and the manifest says which results were reused, from which run);
train.resume_from is part of the training key; the nightly path signs with a Prefect Secret block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.cli import main
from tasks.policy import fresh_key, resume_fingerprint, train_outputs_problems

SMOKE_ARGS = ["--steps", "6", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1",
              "--set", "eval.require_kl_improvement=false",  # about caching and lineage, not learning (issue 26.2)
              "--set", "train.checkpoint_every=3"]


@pytest.mark.slow
def test_three_smoke_runs_from_three_folders_share_one_cache(prefect_server, tiny_pair, tmp_path, monkeypatch, capsys):
    """Three `kdflow smoke` runs from three folders, one PREFECT_HOME/KDFLOW_HOME, default (relative)
    evidence and work dirs; the first folder is deleted before the third. All pass and verify; the
    second reuses the first's training (lineage says so), the third trains again instead of failing."""
    from prefect.blocks.system import Secret

    key = tmp_path / "nightly.pem"
    assert main(["evidence", "keygen", str(key)]) == 0
    Secret(value=key.read_text()).save("kdflow-test-evidence-key", overwrite=True)
    folders = [tmp_path / f"folder-{i}" for i in range(3)]
    manifests = []
    for i, folder in enumerate(folders):
        folder.mkdir()
        monkeypatch.chdir(folder)
        if i == 2:
            shutil.rmtree(folders[0])
        extra = ["--no-cache"] if i == 0 else []  # the first fills the cache afresh (earlier tests share it)
        if i == 2:  # the nightly deployment's path: a Secret block holds the signing key
            extra = ["--set", "orchestration.evidence_signing_key_block=kdflow-test-evidence-key"]
        assert main(["smoke", *SMOKE_ARGS, *extra]) == 0, capsys.readouterr().err[-2000:]
        (run_dir,) = (folder / "evidence").iterdir()
        assert main(["evidence", "verify", str(run_dir)]) == 0, capsys.readouterr().err
        m = json.loads((run_dir / "manifest.json").read_text())
        assert m["run"]["status"] == "pass" and Path(m["training"]["run_dir"]).is_absolute()
        manifests.append(m)
    first, second, third = (m["lineage"]["train_student"] for m in manifests)
    assert first["cached"] is False and first["produced_by_run"] == manifests[0]["run"]["name"]
    assert second["cached"] is True and second["produced_by_run"] == manifests[0]["run"]["name"]
    assert second["flow_run_id"] == manifests[0]["run"]["flow_run_id"]
    assert manifests[1]["training"]["run_dir"].startswith(str(folders[0]))  # ... and lineage says why
    assert third["cached"] is False and "is gone" in third["rerun_reason"]
    assert manifests[2]["training"]["run_dir"].startswith(str(folders[2]))
    assert manifests[0]["run"]["flow_run_url"].startswith("http://127.0.0.1:")  # the test server's UI
    run3 = folders[2] / "evidence" / manifests[2]["run"]["name"]
    assert (run3 / "manifest.sig").is_file()
    assert main(["evidence", "verify", str(run3), "--pubkey", str(tmp_path / "nightly.pub.pem")]) == 0


def test_resume_from_is_part_of_the_training_key(tmp_path, tiny_pair):
    assert resume_fingerprint(None) is None
    assert resume_fingerprint(str(tmp_path / "nope")).endswith(":missing")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_pair[1], ckpt)
    before = resume_fingerprint(str(ckpt))
    (ckpt / "trainer_state.json").write_text("{}")
    assert resume_fingerprint(str(ckpt)) not in (before, None)


def _train_result(tmp_path: Path, **paths):
    from kd.hashing import hash_dir
    from kd.results import TrainResult

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    for name in ("metrics.jsonl", "train.log", "heldout.safetensors"):
        (tmp_path / name).write_text("x")
    fields = dict(run_dir=str(tmp_path), checkpoint_dir=str(ckpt), checkpoint_sha256=hash_dir(ckpt),
                  metrics_path=str(tmp_path / "metrics.jsonl"), log_path=str(tmp_path / "train.log"),
                  heldout_path=str(tmp_path / "heldout.safetensors"), steps=1, tokens=1, initial_loss=2.0,
                  final_loss=1.0, tokens_per_s=1.0, wall_s=1.0, peak_memory_bytes=1, device="cpu", dtype="float32")
    return TrainResult(**{**fields, **paths})


def test_stale_cache_hits_get_a_new_key(tmp_path):
    """A record whose files are gone, changed, or relative is not handed on: the key moves, deterministically."""
    good = _train_result(tmp_path)
    assert train_outputs_problems(good) == []
    assert "relative path" in train_outputs_problems(good.model_copy(update={"metrics_path": "runs/x/metrics.jsonl"}))[0]
    records = {"k": good}
    store = SimpleNamespace(exists=lambda k: k in records, read=lambda k: SimpleNamespace(result=records[k]))
    ctx = SimpleNamespace(result_store=store, task_run=SimpleNamespace(flow_run_id="f1"))
    assert fresh_key(ctx, "k", train_outputs_problems, "train_student") == "k"  # valid hit: same key
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"edited")
    moved = fresh_key(ctx, "k", train_outputs_problems, "train_student")
    assert moved != "k" and moved == fresh_key(ctx, "k", train_outputs_problems, "train_student")
    from kd.hashing import hash_dir

    # the rerun stored a fresh result there: the next run hits it
    records[moved] = good.model_copy(update={"checkpoint_sha256": hash_dir(tmp_path / "ckpt")})
    assert fresh_key(ctx, "k", train_outputs_problems, "train_student") == moved
    shutil.rmtree(tmp_path / "ckpt")
    assert "is gone" in train_outputs_problems(good)[0]
    assert fresh_key(ctx, "k", train_outputs_problems, "train_student") not in ("k", moved)


def _task_states(flow_run_id: str, want: set[str], wait_s: float = 60.0) -> dict[str, str]:
    """{step: final state name} of a finished flow run's task runs, read from the API (the test waits
    for Prefect's asynchronous state delivery; the product never reads these back)."""
    import time
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
            states = {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state and r.state.is_final()}
            if want <= set(states) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


@pytest.mark.slow
def test_lineage_is_what_the_flow_saw_not_a_lagging_server_read(prefect_server, tiny_pair, tmp_path, monkeypatch,
                                                                  capsys):
    """Issue 21.1 + 21.6. Prefect delivers task-run states to the server asynchronously; on a busy server a
    read right after a step returns an older state. Here every read of task runs during the two runs
    returns them `Running` (the worst lag). The second of two identical-data runs must still say, in its
    manifest and on its run page, that every step was a cache hit produced by the first run; read from the
    API afterwards, every data-side step of run 2 is `Cached` (a key that differs between the run that
    makes a folder and later runs would show `Completed` here)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Running

    real = SyncPrefectClient.read_task_runs

    def lagging(self, *args, **kwargs):
        return [r.model_copy(update={"state": Running()}) for r in real(self, *args, **kwargs)]

    monkeypatch.setattr(SyncPrefectClient, "read_task_runs", lagging)
    manifests = []
    for i in range(2):
        folder = tmp_path / f"run-{i}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        extra = ["--no-cache"] if i == 0 else []  # the first computes every step (earlier tests share the cache)
        assert main(["smoke", *SMOKE_ARGS, "--set", "train.lr=2e-3", *extra]) == 0, capsys.readouterr().err[-2000:]
        (run_dir,) = (folder / "evidence").iterdir()
        manifests.append(json.loads((run_dir / "manifest.json").read_text()))
    monkeypatch.setattr(SyncPrefectClient, "read_task_runs", real)
    first, second = manifests
    steps = ("pull_models", "check_vocab", "prepare_data", "train_student", "evaluate_baselines", "evaluate")
    for step in steps:
        assert first["lineage"][step]["cached"] is False, (step, first["lineage"][step])
        assert second["lineage"][step] == {"cached": True, "produced_by_run": first["run"]["name"],
                                           "flow_run_id": first["run"]["flow_run_id"], "rerun_reason": None}, step
    states = _task_states(second["run"]["flow_run_id"], set(steps))
    assert {s: states.get(s) for s in steps} == {s: "Cached" for s in steps}, states

    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:  # artifacts of cached steps rebuilt, naming the producer
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(second["run"]["flow_run_id"])])))
    by_key = {a.key: a for a in arts}
    for key in ("prepared-data", "vocab-alignment", "pull-files", "eval-comparison"):
        assert key in by_key and first["run"]["name"] in (by_key[key].description or ""), (key, sorted(by_key))
