"""Offline teacher through the real distill flow on a real Prefect server: the cache step is a DAG step,
reused (Cached, read back from the API) by a second run with another alpha and lr, which runs zero
teacher forwards; training never loads the teacher; the evidence names the cache and who built it."""

from __future__ import annotations

import json
import sys

import pytest

from kd.config import load_config
from kd.evidence.verify import verify_run_dir
from tests.conftest import smoke_overrides
from tests.prefect_helpers import artifacts, task_states


@pytest.mark.slow
def test_second_run_with_other_alpha_and_lr_reuses_the_cache_without_teacher_forwards(
        prefect_server, tiny_pair, tmp_path, monkeypatch):
    from backends.hf import HFBackend
    from flows.distill import distill

    teacher_dir = str(tiny_pair[0])
    loads: list[str] = []  # module that loaded the teacher, one entry per load
    real_load = HFBackend.load

    def spying_load(self, model_dir, **kw):
        if str(model_dir) == teacher_dir:
            loads.append(sys._getframe(1).f_globals["__name__"])
        return real_load(self, model_dir, **kw)

    monkeypatch.setattr(HFBackend, "load", spying_load)
    base = smoke_overrides(tmp_path, steps=6) + [
        # T = 1: at the smoke preset's T = 4 the tiny teacher is nearly flat over its 360 ids and a top-32 cache
        # keeps too little of it to teach much (bench/results/teacher_cache-*.json measures k vs T); the KL gate
        # is off all the same (smoke_overrides): this test is about the cache, not about learning
        "kd.teacher_mode=offline", "kd.top_k=32", "kd.temperature=1.0", f"kd.cache_dir={tmp_path / 'teacher-cache'}",
        f"data.prepared_dir={tmp_path / 'prepared'}", "data.max_tokens=5000", "eval.max_batches=2"]
    runs = []
    for extra in (["kd.alpha=0.3", "train.lr=1e-3"], ["kd.alpha=0.5", "train.lr=5e-4"]):
        loads.clear()
        state = distill(load_config("configs/smoke.yaml", base + extra), return_state=True)
        assert state.is_completed(), state
        result = state.result()
        states = task_states(state.state_details.flow_run_id)
        manifest = json.loads((tmp_path / "evidence" / result["run"] / "manifest.json").read_text())
        assert verify_run_dir(tmp_path / "evidence" / result["run"]) == []
        table = {r["field"]: r["value"] for r in json.loads(artifacts(state.state_details.flow_run_id)["teacher-cache"].data)}
        manifest["_artifact"] = table
        runs.append((result, states, manifest, list(loads)))

    (r1, s1, m1, l1), (r2, s2, m2, l2) = runs
    assert s1["cache_teacher_logits"] == "Completed" and s1["train_student"] == "Completed"
    assert s2["cache_teacher_logits"] == "Cached" and s2["train_student"] == "Completed"
    assert "kd.train" not in l1 + l2  # offline training never loads the teacher
    assert "kd.teacher_cache.step" in l1 and "kd.teacher_cache.step" not in l2  # run 2: zero teacher forwards
    c1, c2 = m1["training"]["teacher_cache"], m2["training"]["teacher_cache"]
    assert c1["status"] == "built" and c1["teacher_forwards"] > 0
    assert c2["status"] == "reused" and c2["teacher_forwards"] == 0 and c2["shards_built"] == 0
    assert c1["folder"] == c2["folder"] and c1["manifest_sha256"] == c2["manifest_sha256"]
    assert c2["built_by_run"] == r1["run"]
    assert m2["lineage"]["cache_teacher_logits"]["cached"] is True
    assert m2["lineage"]["cache_teacher_logits"]["produced_by_run"] == r1["run"]
    assert m1["training"]["final_loss"] < m1["training"]["initial_loss"]
    assert m2["config"]["kd"]["alpha"] == 0.5 and r2["status"] == "pass"
    a1, a2 = m1["_artifact"], m2["_artifact"]  # the run page's teacher-cache table, read from the API
    assert a1["status"] == "built" and a2["status"].startswith("reused") and a2["teacher forwards now"] == "0"
    assert float(a1["bytes/token on disk"]) > 0 and a1["build tokens/s"] != "–" and int(a1["shards"]) >= 2


def _fake_cache_result():
    from kd.results import TeacherCacheResult

    return TeacherCacheResult(
        folder="/x/cache/abc", key="abc", manifest_sha256="0" * 64, stat="s", status="built", built_by_run="run-0",
        top_k=64, vocab=360, encoding={"encoding": "packed", "bytes_per_token": 81}, cache_temperature=1.0,
        exactness={}, tokens=10, shards=1, shards_built=1, teacher_forwards=1, bytes=810, bytes_per_token=81.0)


@pytest.mark.parametrize("crash", [False, True])
def test_cache_step_delegates_to_its_deployment(monkeypatch, crash):
    """orchestration.cache_deployment: the step runs as that deployment (JSON parameters, waits as long as
    it takes); its result comes back, and a crashed child fails the run naming the child."""
    from types import SimpleNamespace
    from uuid import uuid4

    import prefect.deployments
    from prefect.states import Completed, Crashed

    from flows.teacher_cache import CacheDeploymentFailed
    from kd.results import ModelSnapshot, PreparedData, VocabAlignment
    from flows.teacher_cache import cache_step

    want = _fake_cache_result()
    child = SimpleNamespace(id=uuid4(), name="teacher-cache-run-1",
                            state=Crashed(message="worker lost") if crash else Completed(data=want))
    seen = {}

    def fake_run_deployment(name, parameters, timeout, poll_interval):
        seen.update(name=name, parameters=parameters, timeout=timeout)
        return child

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    cfg = load_config("configs/smoke.yaml", ["kd.teacher_mode=offline",
                                             "orchestration.cache_deployment=kd-teacher-cache/teacher"])
    snap = ModelSnapshot(role="teacher", repo="tiny:teacher", revision="main", kind="tiny", resolved_commit="local",
                         local_dir="/x/t", files={"a": "0" * 64}, total_bytes=1)
    al = VocabAlignment(verdict="identical", teacher_rows=384, student_rows=384, teacher_tokenizer_size=360,
                        student_tokenizer_size=360, rows_kept=384, valid_vocab=360)
    prep = PreparedData(path="/x/p", fingerprint="f", content_hash="c", format="text", seq_len=64, source_files=[],
                        tokenizer_sha256="t", counts={})
    if crash:
        with pytest.raises(CacheDeploymentFailed, match="kd-teacher-cache/teacher.*teacher-cache-run-1.*Crashed"):
            cache_step(cfg, snap, al, prep, "run-1")
    else:
        assert cache_step(cfg, snap, al, prep, "run-1") == want
    assert seen["name"] == "kd-teacher-cache/teacher" and seen["timeout"] is None
    assert seen["parameters"]["run_name"] == "run-1" and json.dumps(seen["parameters"])
