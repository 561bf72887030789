"""The distill flow on a real Prefect server (the session's prefect_test_harness), read back through the API.

One fresh run (module fixture) is shared: a second run of the same config is `Cached`; a `--no-cache`
run with an injected transient failure retries and resumes from its checkpoint; a validation error
is not retried; every task's artifacts are on the server; headless Chromium sees them in the UI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from kd.config import RunConfig, load_config
from kd.errors import ConfigError, TransientError
from kd.manifest import verify_run_dir
from tests.prefect_helpers import (
    SMOKE, artifacts, concurrency_limit, flow_run_by_name, orch_overrides, stop_process, task_run, task_states,
)

pytestmark = pytest.mark.slow

CACHED_STEPS = ("pull_models", "check_vocab", "prepare_data", "train_student", "evaluate")
NEVER_CACHED = ("preflight", "write_evidence")
ARTIFACT_KEYS = {"preflight-plan", "pull-files", "vocab-alignment", "train-progress", "train-metrics",
                 "eval-comparison", "evidence-summary", "evidence-folder"}
CHECKPOINT_EVERY, FAIL_AT_STEP = 3, 5  # the transient failure hits step 5, after the step-3 checkpoint
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1400",
                  "--virtual-time-budget=20000"]


@dataclass
class Run:
    config: RunConfig
    flow_run_id: UUID
    result: dict
    evidence: Path


def _run(config: RunConfig) -> Run:
    from flows.distill import distill

    state = distill(config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    return Run(config, state.state_details.flow_run_id, result, Path(config.evidence_dir) / result["run"])


@pytest.fixture(scope="module")
def first_run(prefect_server, tiny_pair, tmp_path_factory) -> Run:
    """A fresh run (refresh_cache, so nothing an earlier test cached is reused); it fills the cache."""
    tmp = tmp_path_factory.mktemp("prefect-flow")
    return _run(load_config(SMOKE, orch_overrides(tmp, "orchestration.refresh_cache=true")))


def test_first_run_completes_every_task_and_verifies(first_run):
    states = task_states(first_run.flow_run_id)
    assert set(states) == set(CACHED_STEPS + NEVER_CACHED)
    assert all(s == "Completed" for s in states.values()), states
    assert first_run.result["status"] == "pass"
    assert verify_run_dir(first_run.evidence) == []
    assert re.fullmatch(r"distill-tiny-student-from-tiny-teacher-\d{8}-\d{6}", first_run.result["run"])


def test_second_run_of_same_config_is_cached(first_run):
    """Same content, new run: pull/vocab/train/eval are `Cached` on the server; preflight and evidence run."""
    second = _run(first_run.config.model_copy(update={
        "orchestration": first_run.config.orchestration.model_copy(update={"refresh_cache": False})}))
    assert second.flow_run_id != first_run.flow_run_id
    states = task_states(second.flow_run_id)
    assert {k: states[k] for k in CACHED_STEPS} == {k: "Cached" for k in CACHED_STEPS}, states
    assert {k: states[k] for k in NEVER_CACHED} == {k: "Completed" for k in NEVER_CACHED}, states
    # the cached training result is the first run's checkpoint, byte for byte, and the evidence verifies
    m1 = json.loads((first_run.evidence / "manifest.json").read_text())
    m2 = json.loads((second.evidence / "manifest.json").read_text())
    assert m2["training"]["checkpoint_sha256"] == m1["training"]["checkpoint_sha256"]
    assert verify_run_dir(second.evidence) == []


def test_no_cache_run_retries_transient_failure_and_resumes_from_checkpoint(first_run, monkeypatch, capsys,
                                                                           tmp_path):
    """`kdflow run --no-cache` with training failing once (TransientError at step 5, after the step-3
    checkpoint): nothing is served from the cache, the retry resumes at step 3, the run passes, and both
    attempts held the GPU slot (global concurrency limit with 1 slot), released at the end."""
    import tasks.train
    from kd.cli import main

    real_train = tasks.train.train_student
    attempts: list[dict] = []

    def flaky_train(cfg, *args, on_step=None, **kwargs):
        attempt = len(attempts) + 1
        attempts.append({"active_slots": concurrency_limit(cfg.orchestration.gpu_slots).active_slots})

        def step(row):
            on_step(row)
            if attempt == 1 and row["step"] == FAIL_AT_STEP:
                raise TransientError(f"injected: worker lost at step {FAIL_AT_STEP}")

        return real_train(cfg, *args, on_step=step, **kwargs)

    monkeypatch.setattr(tasks.train, "train_student", flaky_train)
    cfg = first_run.config
    assert cfg.train.checkpoint_every == CHECKPOINT_EVERY < FAIL_AT_STEP < cfg.train.steps
    preset = tmp_path / "preset.yaml"  # the first run's config as a preset file, cache setting left to the flag
    data = cfg.model_dump(mode="json", exclude={"name"})
    data["orchestration"].update(refresh_cache=False, retry_delay_s=0)
    preset.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["run", str(preset), "--no-cache"])
    out = capsys.readouterr().out
    assert code == 0, out
    run_name = json.loads(out[out.index("{"):])["run"]
    flow_run = flow_run_by_name(run_name)

    states = task_states(flow_run.id)
    assert {k: states[k] for k in CACHED_STEPS} == {k: "Completed" for k in CACHED_STEPS}, states  # --no-cache
    train = task_run(flow_run.id, "train_student")
    assert train.run_count == 2  # one failure, one retry
    assert len(attempts) == 2
    manifest = json.loads((Path(cfg.evidence_dir) / run_name / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == CHECKPOINT_EVERY
    steps = [json.loads(line)["step"] for line in Path(manifest["training"]["metrics_path"]).read_text().splitlines()]
    assert steps == list(range(1, cfg.train.steps + 1))  # the crashed attempt's steps 4-5 were not kept twice
    assert manifest["run"]["status"] == "pass"

    limit = concurrency_limit(cfg.orchestration.gpu_slots)
    assert limit.limit == 1
    assert [a["active_slots"] for a in attempts] == [1, 1]  # each attempt trained while holding the slot
    assert limit.active_slots == 0  # released after the failure and after the success


def test_validation_error_in_training_is_not_retried(first_run, monkeypatch, tmp_path):
    """A ConfigError inside training fails the task at once (one attempt), and the run with it."""
    import tasks.train
    from flows.distill import distill

    calls = []

    def bad_train(cfg, *args, **kwargs):
        calls.append(1)
        raise ConfigError("train.batch_size: injected validation error")

    monkeypatch.setattr(tasks.train, "train_student", bad_train)
    # a new seed: training is not cached, pull and vocab are
    cfg = load_config(SMOKE, orch_overrides(tmp_path, "train.seed=7", "orchestration.retry_delay_s=0"))
    assert cfg.orchestration.retries >= 1
    state = distill(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="injected validation error"):
        state.result()
    train = task_run(state.state_details.flow_run_id, "train_student")
    assert train.state.is_failed() and train.run_count == 1 and calls == [1]
    (run_dir,) = (tmp_path / "evidence").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["run"]["status"] == "fail"


def test_every_task_leaves_its_artifacts(first_run):
    arts = artifacts(first_run.flow_run_id)
    assert set(arts) == ARTIFACT_KEYS
    manifest = json.loads((first_run.evidence / "manifest.json").read_text())

    def table(key):
        data = arts[key].data
        return json.loads(data) if isinstance(data, str) else data

    assert "Preflight passed" in arts["preflight-plan"].data
    pulled = {(r["role"], r["file"]): r["sha256"] for r in table("pull-files")}
    for role in ("teacher", "student"):
        files = manifest["models"][role]["files"]
        assert {f: pulled[(role, f)] for f in files} == files
    vocab = {r["field"]: r["value"] for r in table("vocab-alignment")}
    assert vocab["verdict"] == manifest["vocab"]["verdict"]
    assert int(vocab["rows_kept"]) == manifest["vocab"]["rows_kept"]
    assert float(arts["train-progress"].data) == pytest.approx(100.0)
    metrics = {r["metric"]: r["value"] for r in table("train-metrics")}
    assert float(metrics["final_loss"]) == pytest.approx(manifest["training"]["final_loss"])
    rows = {r["model"]: r for r in table("eval-comparison")}
    assert set(rows) == {"teacher", "student-before", "student-after"}
    assert rows["student-after"]["loss"] == pytest.approx(manifest["eval"]["student_after"]["loss"], abs=1e-4)
    summary = arts["evidence-summary"].data
    assert f"Run {first_run.result['run']}: **PASS**" in summary
    assert all(f["id"] in summary for f in manifest["falsifiers"])
    assert f"]({first_run.evidence.resolve().as_uri()})" in arts["evidence-folder"].data  # stored as a markdown link


@pytest.fixture
def ui_server(prefect_server, tmp_path):
    """The Prefect UI over the session server's database (the test harness serves the API only).

    A second `prefect server start --no-services` on a free port reads the same SQLite file; the UI it
    serves talks to its own /api, so it shows exactly what the session server holds."""
    import socket
    import sys
    import time
    import urllib.request

    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": PREFECT_SERVER_DATABASE_CONNECTION_URL.value(),
           "PREFECT_HOME": str(tmp_path / "ui-home"), "PREFECT_SERVER_UI_ENABLED": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = open(tmp_path / "ui-server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-services", "--ui", "--analytics-off"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "ui-server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{base}/api/health", timeout=2).read().strip() == b"true":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "UI server not healthy after 120 s"
            time.sleep(0.5)
        yield base
    finally:
        stop_process(proc)
        log.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed: `apt-get install -y chromium`")
def test_ui_flow_run_page_shows_the_artifacts(first_run, ui_server, tmp_path):
    """What a person opening the run in the Prefect UI sees: the run name and every artifact key.

    The flow-run page of the React UI (/v2) honours ?tab=Artifacts on a cold load (the classic UI resets
    to Logs). The DOM is checked as text; the screenshot is kept at tmp_path/flow-run.png to look at
    (and copied to $KDFLOW_SCREENSHOT_DIR when set)."""
    url = f"{ui_server}/v2/runs/flow-run/{first_run.flow_run_id}?tab=Artifacts"

    def chromium(*mode: str) -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(mode[0])}"
        return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, url],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    dom = chromium("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom.stdout, flags=re.S)))
    assert first_run.result["run"] in text
    shown = {k for k in ARTIFACT_KEYS if k in text}
    assert shown == ARTIFACT_KEYS, f"missing in the UI: {ARTIFACT_KEYS - shown}"

    png = tmp_path / "flow-run.png"
    shot = chromium(f"--screenshot={png}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    keep = os.environ.get("KDFLOW_SCREENSHOT_DIR")
    if keep:  # e.g. KDFLOW_SCREENSHOT_DIR=bench/results to keep it as evidence
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(keep) / "prefect-ui-flow-run.png")
