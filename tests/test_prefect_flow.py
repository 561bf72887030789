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
from kd.evidence.verify import verify_run_dir
from tests.prefect_helpers import (
    SMOKE, artifacts, concurrency_limit, flow_run_by_name, orch_overrides, stop_process, task_run, task_states,
)

pytestmark = pytest.mark.slow

CACHED_STEPS = ("pull_models", "check_vocab", "prepare_data", "train_student", "evaluate_baselines", "evaluate")
NEVER_CACHED = ("preflight", "write_evidence")
ARTIFACT_KEYS = {"preflight-plan", "pull-files", "vocab-alignment", "prepared-data", "train-progress", "train-metrics",
                 "eval-comparison", "loss-curve", "evidence-summary", "evidence-folder"}
STEP_ARTIFACTS = {"pull_models": ("pull-files",), "check_vocab": ("vocab-alignment",), "prepare_data": ("prepared-data",),
                  "train_student": ("train-progress", "train-metrics"), "evaluate": ("eval-comparison",)}
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


@pytest.fixture(scope="module")
def cached_run(first_run) -> Run:
    """The same config again, cache on: pull/vocab/prepare/train/eval are served from the cache."""
    return _run(first_run.config.model_copy(update={
        "orchestration": first_run.config.orchestration.model_copy(update={"refresh_cache": False})}))


def test_second_run_of_same_config_is_cached(first_run, cached_run):
    """Same content, new run: pull/vocab/train/eval are `Cached` on the server; preflight and evidence run."""
    second = cached_run
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
    from flows.cli import main

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
    assert set(arts) >= ARTIFACT_KEYS  # (+ sample-generations when eval generates samples)
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
    assert int(vocab["rows_kept"].replace(",", "")) == manifest["vocab"]["rows_kept"]
    assert float(arts["train-progress"].data) == pytest.approx(100.0)
    metrics = {r["metric"]: r["value"] for r in table("train-metrics")}
    assert float(metrics["final_loss"]) == pytest.approx(manifest["training"]["final_loss"], rel=1e-3)  # 4 sig. fig.
    rows = {r["model"]: r for r in table("eval-comparison")}
    assert set(rows) == {"teacher", "student-before", "student-after", "after − before"}
    assert rows["student-after"]["loss"] == pytest.approx(manifest["eval"]["student_after"]["loss"], rel=1e-3)
    delta = rows["after − before"]  # the change distillation made, per metric
    assert delta["kl_to_teacher"] == pytest.approx(
        manifest["eval"]["student_after"]["kl_to_teacher"] - manifest["eval"]["student_before"]["kl_to_teacher"],
        rel=1e-3, abs=1e-4)
    summary = arts["evidence-summary"].data
    ship = {"ship": "SHIP", "dont_ship": "DON'T SHIP"}[manifest["eval"]["ship"]["verdict"]]
    assert f"Run {first_run.result['run']}: pipeline **PASS** · ship verdict **{ship}**" in summary
    assert all(f["id"] in summary for f in manifest["falsifiers"])
    assert all(c["id"] in summary for c in manifest["eval"]["ship"]["checks"])  # each ship check, its verdict
    assert f"]({first_run.evidence.resolve().as_uri()})" in arts["evidence-folder"].data  # stored as a markdown link


def test_cached_run_shows_every_artifact_and_names_the_run_it_reused(first_run, cached_run):
    """A run whose steps were all served from the cache still has the full artifact set (rebuilt from
    the cached results), each rebuilt one naming the run that produced it; the loss curve too."""
    arts = artifacts(cached_run.flow_run_id)
    assert set(arts) >= ARTIFACT_KEYS
    assert set(arts) == set(artifacts(first_run.flow_run_id))  # the same set as the run that computed them
    source = first_run.result["run"]
    states = task_states(cached_run.flow_run_id)
    assert states["train_student"] == states["evaluate"] == "Cached"
    rebuilt = [key for step, keys in STEP_ARTIFACTS.items() if states[step] == "Cached" for key in keys]
    for key in rebuilt:  # each names the run that computed the result it shows
        assert f"reused from run {source}" in (arts[key].description or ""), (key, arts[key].description)
    assert float(arts["train-progress"].data) == pytest.approx(100.0)
    curve = arts["loss-curve"].data
    assert "data:image/png;base64," in curve and source in curve
    assert f"| train_student | cached | {source} |" in arts["evidence-summary"].data


def test_run_logs_tell_the_story(first_run):
    """The Logs tab: the preflight plan, a line per train.log_every steps, each verdict."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first_run.flow_run_id])))
    text = "\n".join(log.message for log in logs)
    steps = first_run.config.train.steps
    assert "preflight passed" in text and "kdflow plan" in text
    assert [f"step {i}/{steps} loss=" in text for i in range(1, steps + 1)] == [True] * steps
    manifest = json.loads((first_run.evidence / "manifest.json").read_text())
    for f in manifest["falsifiers"]:
        assert f"{f['verdict'].upper()} {f['id']}" in text
    assert f"run {first_run.result['run']}: PASS" in text


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
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "ui-server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{base}/api/health", timeout=2).read().strip() == b"true":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "UI server not healthy after 300 s"
            time.sleep(0.5)
        yield base
    finally:
        stop_process(proc)
        log.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed: `apt-get install -y chromium`")
def test_ui_shows_a_cached_runs_artifacts_and_loss_curve(cached_run, ui_server, tmp_path):
    """What a person opening a CACHED run in the Prefect UI sees: the run name and every artifact on the
    Artifacts tab, and the loss curve drawn on the loss-curve artifact's page.

    The flow-run page of the React UI (/v2) honours ?tab=Artifacts on a cold load (the classic UI resets
    to Logs). The DOM is checked as text; the screenshots are kept in tmp_path (and copied to
    $KDFLOW_SCREENSHOT_DIR when set: docs/img/ holds the ones in the docs)."""

    def chromium(url: str, *mode: str, size: str = "1600,1100") -> subprocess.CompletedProcess:
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--window-size")] + [f"--window-size={size}"]
        return subprocess.run([str(CHROMIUM), *flags, f"--user-data-dir={profile}", *mode, url],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    def visible_text(html: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", html, flags=re.S)))

    run_page = f"{ui_server}/v2/runs/flow-run/{cached_run.flow_run_id}?tab=Artifacts"
    dom = chromium(run_page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = visible_text(dom.stdout)
    assert cached_run.result["run"] in text
    shown = {k for k in ARTIFACT_KEYS if k in text}
    assert shown == ARTIFACT_KEYS, f"missing in the UI: {ARTIFACT_KEYS - shown}"

    curve = artifacts(cached_run.flow_run_id)["loss-curve"]
    curve_page = f"{ui_server}/v2/artifacts/artifact/{curve.id}"
    dom = chromium(curve_page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'<img[^>]+src="data:image/png;base64,', dom.stdout), "the loss curve is not drawn"
    assert "Loss curve" in visible_text(dom.stdout)

    shots = {"prefect-ui-cached-run-artifacts.png": (run_page, "1600,1500"),
             "prefect-ui-loss-curve.png": (curve_page, "1600,900")}
    for name, (url, size) in shots.items():
        png = tmp_path / name
        shot = chromium(url, f"--screenshot={png}", size=size)
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    keep = os.environ.get("KDFLOW_SCREENSHOT_DIR")
    if keep:  # KDFLOW_SCREENSHOT_DIR=docs/img refreshes the pictures in docs/prefect.md
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in shots:
            shutil.copy2(tmp_path / name, Path(keep) / name)
