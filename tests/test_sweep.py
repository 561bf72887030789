"""Sweeps (issue 18): the spec refused through the real CLI before any trial starts (exit 2 naming the
field); a small sweep on a real Prefect server: shared steps Cached in every trial (read from the API),
each trial a child distill flow run, the sweep folder verifies and a tampered one does not; a trial
forced to fail does not stop the others, and a rerun runs exactly that trial again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from flows.cli import main
from tests.conftest import REPO
from tests.prefect_helpers import task_runs, task_states

SHARED_STEPS = ("pull_models", "check_vocab", "prepare_data", "cache_teacher_logits", "evaluate_baselines")


def _spec(tmp: Path, **over) -> dict:
    spec = {
        "name": "tsw", "base": "configs/smoke.yaml",
        "set": ["kd.teacher_mode=offline", "kd.top_k=32", "kd.temperature=1.0", "train.steps=4",
                "train.checkpoint_every=2", "train.warmup_steps=1", "train.lr=1e-3", "eval.max_batches=2",
                "eval.require_kl_improvement=false",  # about sweeps, not learning (tests/conftest.py NOT_ABOUT_LEARNING)
                "eval.sample_max_new_tokens=0", f"kd.cache_dir={tmp / 'teacher-cache'}"],
        "grid": {"kd.alpha": [0.2, 0.5]},
        "objective": {"metric": "kl", "direction": "min"},
        "concurrency": 2, "evidence_dir": str(tmp / "evidence"), "work_dir": str(tmp / "runs"),
    }
    spec.update(over)
    return spec


def _write(tmp: Path, spec: dict) -> Path:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.mark.parametrize("change, named", [
    ({"gird": {"kd.alpha": [0.1]}}, "gird: unknown field"),
    ({"grid": {"kd.alpah": [0.1]}}, "grid.kd.alpah[0]=0.1: kd.alpah: unknown field"),
    ({"grid": {"kd.alpha": [0.1, 1.5]}}, "grid.kd.alpha[1]=1.5: kd.alpha: must be <= 1, got 1.5"),
    ({"grid": {"kd.temperature": ["hot"]}}, "grid.kd.temperature[0]='hot': kd.temperature:"),
    ({"grid": {}}, "grid: empty"),
    ({"grid": {"kd.alpha": []}}, "grid.kd.alpha: empty list"),
    ({"grid": {"name": ["x"]}}, "grid.name: set by the sweep"),
    ({"objective": {"metric": "accuracy", "direction": "min"}}, "objective.metric: unknown metric 'accuracy'"),
    ({"objective": {"metric": "kl", "direction": "down"}}, "objective.direction:"),
    ({"concurrency": 0}, "concurrency: must be >= 1, got 0"),
    ({"trials": [{"train.steps": 0}]}, "trials[0]: train.steps: must be > 0, got 0"),
    ({"set": ["kd.nope=1"]}, "set: kd.nope: unknown field"),
    ({"base": "configs/nope.yaml"}, "base: preset file not found: configs/nope.yaml"),
])
def test_bad_spec_exits_2_naming_the_field_before_any_trial(tmp_path, capsys, change, named):
    path = _write(tmp_path, _spec(tmp_path, **change))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdflow: error: ") and named in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "evidence").exists()  # refused before anything ran


def test_bad_spec_through_the_installed_cli_process(tmp_path):
    path = _write(tmp_path, _spec(tmp_path, grid={"kd.alpha": [0.3], "train.lr": [-1]}))
    p = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", str(path)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "grid.train.lr[0]=-1: train.lr: must be > 0, got -1" in p.stderr


def test_trials_are_named_after_the_sweep_and_their_overrides(tmp_path, capsys):
    from kd.sweep.spec import expand, validate_spec

    spec = validate_spec(_spec(tmp_path, grid={"kd.alpha": [0.2, 0.5], "kd.temperature": [1.0, 2.5]},
                               trials=[{"train.lr": 5e-4, "kd.divergence": "reverse_kl"}]))
    names = [t.name for t in expand(spec)]
    assert names == ["tsw-alpha0.2-temperature1", "tsw-alpha0.2-temperature2.5", "tsw-alpha0.5-temperature1",
                     "tsw-alpha0.5-temperature2.5", "tsw-lr0.0005-divergencereverse_kl"]
    assert names == [t.name for t in expand(spec)]  # deterministic
    t = expand(spec)[3]
    assert (t.config.kd.alpha, t.config.kd.temperature, t.config.name) == (0.5, 2.5, t.name)
    assert t.config.evidence_dir == str(tmp_path / "evidence" / "tsw")
    assert main(["sweep", str(_write(tmp_path, spec.model_dump(exclude_unset=True))), "--dry-run"]) == 0
    assert "5 trials" in capsys.readouterr().out


def test_benchmark_scores_are_read_from_the_eval_report_and_rank_trials():
    """Rows carry the trained student's lm-eval scores (eval.benchmarks.scores[].values.student_after);
    `benchmarks.<task>` ranks by the task's one metric, `benchmarks.<task>.<metric>` by that metric."""
    from kd.sweep.report import benchmarks_of, objective_value, rank

    def manifest(acc, ppl):
        scores = [{"task": "arc_easy", "metric": "acc", "higher_is_better": True,
                   "values": {"teacher": 0.7, "student_before": 0.4, "student_after": acc}},
                  {"task": "wikitext", "metric": "word_perplexity", "higher_is_better": False,
                   "values": {"teacher": 20.0, "student_after": ppl}}]
        return {"eval": {"benchmarks": {"lm_eval_version": "0.4.13", "tasks": [], "scores": scores, "max_length": 64,
                                        "wall_s": {"total": 1.0}}}}

    m = manifest(0.55, 31.0)
    assert benchmarks_of(m) == {"arc_easy.acc": 0.55, "wikitext.word_perplexity": 31.0}
    assert objective_value(m, "benchmarks.arc_easy") == 0.55 == objective_value(m, "benchmarks.arc_easy.acc")
    assert objective_value(m, "benchmarks.nope") is None and objective_value({}, "benchmarks.arc_easy") is None
    rows = [{"name": n, "status": "pass", "objective": objective_value(manifest(a, 30.0), "benchmarks.arc_easy")}
            for n, a in (("a", 0.5), ("b", 0.6), ("c", 0.4))]
    assert rank(rows, "max") == ["b", "a", "c"] and rank(rows, "min") == ["c", "a", "b"]


# ---------------------------------------------------------------- a real sweep on a real server
def _child_runs(parent_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(str(parent_id))])))
    return {r.name: r for r in runs}


def _states(flow_run_id, ready=lambda names: "write_evidence" in {n.rsplit("-", 1)[0] for n in names}) -> dict:
    """{task run name: state} of a flow run once `ready(names)` and nothing is still running: the server
    records task runs from events, a moment after the flow returns."""
    import time

    deadline = time.monotonic() + 60
    while True:
        states = {r.name: r.state.name for r in task_runs(flow_run_id)}
        done = all(v not in ("Running", "Pending", "Scheduled") for v in states.values())
        if (ready(states) and done) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def _run_sweep(spec: dict):
    from flows.sweep import sweep
    from kd.sweep.spec import validate_spec

    state = sweep(validate_spec(spec), return_state=True)
    return state, state.state_details.flow_run_id


@pytest.fixture(scope="module")
def swept(prefect_server, tiny_pair, tmp_path_factory):
    """Two good trials (alpha 0.2, 0.5) and one forced to fail (a better-than-uniform gate no model can pass),
    run once, then the same sweep again."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = _spec(tmp, trials=[{"eval.uniform_perplexity_fraction": 1e-9}])
    first, first_id = _run_sweep(spec)
    second, second_id = _run_sweep(spec)
    return {"spec": spec, "dir": tmp / "evidence" / "tsw", "first": (first, first_id), "second": (second, second_id)}


BAD = "tsw-uniform_perplexity_fraction1e-09"
GOOD = ("tsw-alpha0.2", "tsw-alpha0.5")


@pytest.mark.slow
def test_sweep_runs_each_trial_as_a_child_distill_run_with_shared_steps_cached(swept):
    state, sid = swept["first"]
    assert state.is_failed() and BAD in state.message and all(g not in state.message for g in GOOD), state.message
    children = _child_runs(sid)
    assert set(children) == {*GOOD, BAD}  # real child flow runs of the sweep, named after the trials
    assert {children[g].state.name for g in GOOD} == {"Completed"} and children[BAD].state.name == "Failed"
    for name, run in children.items():  # pull, vocab, data and teacher cache were computed once, by the parent
        states = {k.rsplit("-", 1)[0]: v for k, v in _states(run.id).items()}
        assert {s: states[s] for s in SHARED_STEPS} == {s: "Cached" for s in SHARED_STEPS}, (name, states)
        assert states.get("train_student") == "Completed", (name, states)
    parent = task_states(sid)
    assert parent["cache_teacher_logits"] == "Completed"  # built once (one temperature, one data set)
    # the teacher and student-before are scored once for the 3 trials (issue 27.6), not once per trial
    baselines = [r.state.name for r in task_runs(sid) if r.name.rsplit("-", 1)[0] == "evaluate_baselines"]
    assert sorted(baselines) == ["Cached", "Cached", "Completed"], baselines
    doc = json.loads((swept["dir"] / "sweep.json").read_text())
    assert doc["status"] == "fail" and doc["failed"] == [BAD]
    assert doc["ranking"][-1] == BAD and set(doc["ranking"][:2]) == set(GOOD) and doc["best"] == doc["ranking"][0]
    kls = [r["objective"] for n in doc["ranking"][:2] for r in doc["trials"] if r["name"] == n]
    assert kls == sorted(kls)  # min KL first
    for r in doc["trials"]:  # (sweep.json as the rerun left it: the reused trials' rows are the first run's)
        assert (swept["dir"] / r["name"] / "manifest.json").is_file()
        if r["name"] in GOOD:
            assert r["flow_run_id"] == str(children[r["name"]].id)


@pytest.mark.slow
def test_sweep_summary_artifact_ranks_trials_and_links_child_runs(swept):
    from tests.prefect_helpers import artifacts

    _, sid = swept["first"]
    arts = artifacts(sid)
    md = arts["sweep-summary"].data
    doc = json.loads((swept["dir"] / "sweep.json").read_text())
    assert f"best trial: `{doc['best']}`" in md and "data:image/png;base64," in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows][0].startswith(f"[{doc['ranking'][0]}]")  # linked to its child run
    assert "FAIL" in rows[-1] and BAD in rows[-1]
    assert (swept["dir"] / "objective_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_folder_verifies_and_tampering_fails(swept, tmp_path, capsys):
    assert main(["evidence", "verify", str(swept["dir"])]) == 0, capsys.readouterr().err
    assert main(["evidence", "show", str(swept["dir"])]) == 0
    assert "# Sweep tsw: 2/3 trials passed" in capsys.readouterr().out
    # the ranking swapped
    bad = tmp_path / "ranking"
    shutil.copytree(swept["dir"], bad)
    doc = json.loads((bad / "sweep.json").read_text())
    doc["ranking"][:2] = doc["ranking"][1::-1]
    doc["best"] = doc["ranking"][0]
    (bad / "sweep.json").write_text(json.dumps(doc))
    assert main(["evidence", "verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "FAIL ranking: recorded" in err and "FAIL best: recorded" in err
    # a trial's number changed (and its manifest with it): that trial fails verify, and its row no longer matches
    bad = tmp_path / "trial"
    shutil.copytree(swept["dir"], bad)
    m = json.loads((bad / GOOD[0] / "manifest.json").read_text())
    m["eval"]["student_after"]["kl_to_teacher"] = 1e-6
    (bad / GOOD[0] / "manifest.json").write_text(json.dumps(m))
    assert main(["evidence", "verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL trial {GOOD[0]}: manifest_sha256 recorded" in err and f"FAIL trial {GOOD[0]}: eval.json" in err


@pytest.mark.slow
def test_rerun_reuses_finished_trials_and_runs_exactly_the_failed_one(swept):
    state, sid = swept["second"]
    assert state.is_failed() and BAD in state.message
    ready = lambda names: sum(n.startswith("trial-") for n in names) == 3  # noqa: E731
    states = {k: v for k, v in _states(sid, ready).items() if k.startswith("trial-")}
    assert states == {f"trial-{GOOD[0]}": "Cached", f"trial-{GOOD[1]}": "Cached", f"trial-{BAD}": "Failed"}, states
    (again,) = _child_runs(sid).values()  # one child distill run: the failed trial, again
    assert again.name == BAD and again.state.name == "Failed"
    attempts = list((swept["dir"] / ".attempts").iterdir())
    assert [p.name.startswith(BAD) for p in attempts] == [True]  # the first attempt kept aside, not overwritten
    doc = json.loads((swept["dir"] / "sweep.json").read_text())
    assert set(doc["reused"]) == set(GOOD)
    assert [r["flow_run_id"] for r in doc["trials"] if r["name"] == BAD] == [str(again.id)]
    assert main(["evidence", "verify", str(swept["dir"])]) == 0
