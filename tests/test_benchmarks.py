"""lm-eval benchmarks in the eval step (issue 20): bundled tasks from held-out documents, scores that tell a
worse model from a trained one, optional falsifiers recomputed from the manifest, bad inputs exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.config import BenchmarksConfig, load_config
from kd.data import open_prepared, prepare_data
from kd.data.sources import load_tokenizer
from kd.evaluate.benchmarks import (NO_REGRESSION_ID, RETENTION_ID, benchmark_gates, paired_benchmark_difference,
                                    benchmarks_markdown, run_benchmarks,
                                    retention)
from kd.evaluate.bundled_tasks import (BPB, LASTWORD, MC, REFERENCE, bundled_info, heldout_texts, words,
                                      write_bundled_tasks)
from tests.test_manifest import inputs  # noqa: F401  (the fixture: everything write_evidence needs)

REPO = Path(__file__).resolve().parents[1]
TASKS = [LASTWORD, BPB, MC]


@pytest.fixture(scope="module")
def prepared(tiny_pair, tmp_path_factory):
    cfg = load_config("configs/smoke.yaml", [f"data.prepared_dir={tmp_path_factory.mktemp('prep')}"])
    return prepare_data(cfg.data, tiny_pair[1])


def _texts(split, tok) -> list[str]:
    return [" ".join(tok.decode(np.asarray(split.tokens[s:s + n]).astype(np.int64).tolist(),
                                skip_special_tokens=True).split()) for s, n, _f, _l in split.docs()]


def test_bundled_items_come_from_heldout_documents_only(prepared, tiny_pair):
    folder = write_bundled_tasks(prepared.path, tiny_pair[1])
    info = bundled_info(folder)
    assert set(info["docs"]) == set(TASKS) and all(n > 0 for n in info["docs"].values())
    for name, sha in info["files"].items():  # every file is listed with its hash; YAML names its own data
        import hashlib

        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha
    assert f"test: {folder.resolve() / (LASTWORD + '.jsonl')}" in (folder / f"{LASTWORD}.yaml").read_text()

    ps, tok = open_prepared(prepared.path), load_tokenizer(tiny_pair[1])
    train, held = _texts(ps.train, tok), _texts(ps.heldout, tok)
    lastword = [json.loads(x) for x in (folder / f"{LASTWORD}.jsonl").read_text().splitlines()]
    bpb = [json.loads(x)["text"] for x in (folder / f"{BPB}.jsonl").read_text().splitlines()]
    items = [f"{r['context']} {r['target']}" for r in lastword] + bpb
    for item in items:
        assert any(" ".join(words(item)) in " ".join(words(h)) for h in held), item  # every item is held-out text...
    # ...and no last-word item or passage occurs in any training document (as words, punctuation aside)
    train_blob = "\n".join(" " + " ".join(words(t)) + " " for t in train)
    leaked = [item for item in items if f" {' '.join(words(item))} " in train_blob]
    assert leaked == [], leaked[:3]
    assert info["items_found_in_training_dropped"] > 0  # the smoke corpus repeats sentences: some were dropped


def test_a_heldout_document_duplicated_in_training_is_left_out(tmp_path, tiny_pair):
    lines = [f"the quick fox number {i} runs to the market and back again." for i in range(40)]
    data = tmp_path / "dup.txt"
    data.write_text("\n".join(lines + lines) + "\n")  # every document twice: most held-out ones are also trained on
    cfg = load_config("configs/smoke.yaml", [f"data.source={data}", f"data.prepared_dir={tmp_path / 'prep'}",
                                             "data.heldout_fraction=0.2"])
    p = prepare_data(cfg.data, tiny_pair[1])
    texts, dropped = heldout_texts(p.path, tiny_pair[1])
    ps, tok = open_prepared(p.path), load_tokenizer(tiny_pair[1])
    train = set(_texts(ps.train, tok))
    assert dropped > 0 and not (set(texts) & train)


def three_models(tiny_pair):
    """(teacher, a randomly re-initialised student, the trained tiny student, teacher_dir, student_dir)."""
    from backends import get_backend

    be = get_backend("hf")
    teacher_dir, student_dir = map(str, tiny_pair)
    load = lambda d: be.load(d, device="cpu", dtype=torch.float32, trust_remote_code=False)  # noqa: E731
    teacher, trained, rand = load(teacher_dir), load(student_dir), load(student_dir)
    torch.manual_seed(0)
    for m in rand.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return teacher, rand, trained, teacher_dir, student_dir


@pytest.fixture(scope="module")
def scored(prepared, tiny_pair):
    """Teacher, a randomly re-initialised student (before) and the trained tiny student (after)."""
    teacher, rand, trained, teacher_dir, student_dir = three_models(tiny_pair)
    cfg = BenchmarksConfig(tasks=TASKS, limit=24, limits={MC: 12}, require_no_regression=True, min_retention=0.01)
    folder = write_bundled_tasks(prepared.path, student_dir)
    logs: list[str] = []
    report = run_benchmarks({"teacher": teacher, "student_before": rand, "student_after": trained},
                            {"teacher": teacher_dir, "student_before": student_dir, "student_after": student_dir},
                            cfg, bundled_dir=folder, log=logs.append)
    return cfg, report, logs


def _score(report, task, metric):
    return next(s for s in report.scores if s.task == task and s.metric == metric)


def test_a_randomly_reinitialised_student_scores_worse(scored):
    cfg, report, logs = scored
    assert {t.task for t in report.tasks} == set(TASKS)
    assert {t.task: t.n_docs for t in report.tasks}[MC] == 12  # the per-task limit
    bpb, lw = _score(report, BPB, "bits_per_byte"), _score(report, LASTWORD, "perplexity")
    assert bpb.values["student_after"] < bpb.values["student_before"]
    assert lw.values["student_after"] < lw.values["student_before"]
    assert not bpb.higher_is_better and _score(report, LASTWORD, "acc").higher_is_better
    # the word is scored after a space (lm-eval adds none to loglikelihood targets): the teacher gets many right
    acc = _score(report, LASTWORD, "acc").values
    assert acc["teacher"] > 0.2 and acc["teacher"] > acc["student_before"]
    assert bpb.retention == pytest.approx(bpb.values["teacher"] / bpb.values["student_after"])
    assert any("student_after done" in line for line in logs)  # the Logs tab's progress lines
    assert all(len(t.definition_sha256) == 64 for t in report.tasks) and report.lm_eval_version == "0.4.13"


def test_benchmark_gates_fail_when_the_student_got_worse(scored):
    cfg, report, _ = scored
    lm_only = cfg.model_copy(update={"tasks": [LASTWORD, BPB], "min_retention": None})
    kept = report.model_copy(update={"scores": [s for s in report.scores if s.task != MC and s.metric != "acc"]})
    [g] = benchmark_gates(kept, lm_only)
    assert g.id == NO_REGRESSION_ID and g.verdict == "pass", g.observed
    # the same recorded numbers with the random student as "after": the claim fails, naming the metric
    swapped = kept.model_copy(update={"scores": [s.model_copy(update={"values": {
        **s.values, "student_before": s.values["student_after"], "student_after": s.values["student_before"]}})
        for s in kept.scores]})
    [g] = benchmark_gates(swapped, lm_only)
    assert g.verdict == "fail" and "kdflow_bpb.bits_per_byte" in g.observed
    strict = cfg.model_copy(update={"require_no_regression": False, "min_retention": 1e6})
    [g] = benchmark_gates(report, strict)
    assert g.id == RETENTION_ID and g.verdict == "fail"
    assert retention(float("inf"), 2.0, False) == 0.0 and retention(0.5, 0.0, True) is None
    assert retention(float("nan"), 0.5, True) is None


def test_benchmarks_recorded_in_the_manifest_and_verified(scored, tmp_path, inputs):
    """eval.json + manifest carry the table; verify recomputes the benchmark falsifiers; a flipped
    verdict is named; `evidence show` prints the table."""
    from tests.test_manifest import _eval_report
    from kd.evidence.manifest import write_evidence
    from kd.evidence.verify import verify_run_dir
    from kd.evidence.view import show_run

    cfg, report, _ = scored
    config = inputs["config"].model_copy(deep=True)
    config.eval.benchmarks = cfg
    ev = _eval_report().model_copy(update={"benchmarks": report})
    d = tmp_path / "evidence" / "r1"
    m = write_evidence(d, **{**inputs, "config": config, "eval_report": ev})
    ids = {f.id: f.verdict for f in m.falsifiers}
    assert ids[NO_REGRESSION_ID] == "fail" and ids[RETENTION_ID] == "pass"  # MC acc of 12 items is noise
    assert verify_run_dir(d) == []
    rec = json.loads((d / "manifest.json").read_text())["eval"]["benchmarks"]
    assert {t["task"] for t in rec["tasks"]} == set(TASKS) and rec["lm_eval_version"] == "0.4.13"
    assert json.loads((d / "eval.json").read_text())["benchmarks"] == rec
    text = show_run(d)
    assert "benchmarks (lm-eval 0.4.13" in text and "kdflow_bpb" in text and "bits_per_byte ↓" in text

    # flip the failing verdict to pass (and the status): verify names the falsifier
    raw = json.loads((d / "manifest.json").read_text())
    for f in raw["falsifiers"]:
        f["verdict"] = "pass"
    (d / "manifest.json").write_text(json.dumps(raw))
    problems = verify_run_dir(d)
    assert any(NO_REGRESSION_ID in p for p in problems), problems


def _kdflow(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_bad_benchmark_inputs_exit_2_naming_the_task(tmp_path):
    yaml = tmp_path / "tasks" / "mine.yaml"
    yaml.parent.mkdir()
    yaml.write_text("task: my_offline_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {tmp_path / 'absent.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
                    "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    cases = {
        "limit": (["--set", "eval.benchmarks.tasks=[kdflow_bpb]", "--set", "eval.benchmarks.limits={kdflow_bpb: 0}"],
                  "eval.benchmarks.limits.kdflow_bpb: must be > 0"),
        "no data": (["--set", "eval.benchmarks.tasks=[my_offline_task]",
                     "--set", f"eval.benchmarks.include_paths=[{yaml.parent}]"],
                    f"task 'my_offline_task' has no offline data: data file {tmp_path / 'absent.jsonl'} does not exist"),
        "global limit": (["--set", "eval.benchmarks.limit=-1"], "eval.benchmarks.limit: must be > 0"),
    }
    for what, (args, msg) in cases.items():
        r = _kdflow("run", "configs/smoke.yaml", "--dry-run", *args)
        assert r.returncode == 2, (what, r.stdout[-500:], r.stderr[-1500:])
        assert msg in r.stderr, (what, r.stderr[-1500:])
    # the good case: the plan states the documents per task and a time estimate
    r = _kdflow("run", "configs/smoke.yaml", "--dry-run", "--set", f"eval.benchmarks.tasks=[{','.join(TASKS)}]",
                "--set", "eval.benchmarks.limit=30")
    assert r.returncode == 0, r.stderr[-1500:]
    # kdflow_bpb_reference (eval.reference_text, out of domain) is scored whenever benchmarks run
    assert re.search(r"benchmarks kdflow_lastword ~30, kdflow_bpb ~\d+, kdflow_mc ~30, kdflow_bpb_reference ~30 docs "
                     r".* x 3 models, ~\d+ s", r.stdout), \
        r.stdout[-1500:]


@pytest.mark.slow
def test_unknown_and_not_downloaded_registry_tasks_exit_2():
    """lm-eval's own registry is read (~30-50 s on 2 cores): an unknown name, and a registry task whose
    data set is not in the local Hugging Face cache, are refused before anything runs."""
    r = _kdflow("run", "configs/smoke.yaml", "--dry-run", "--set", "eval.benchmarks.tasks=[kdflow_bpb,no_such_task]")
    assert r.returncode == 2 and "unknown lm-eval task 'no_such_task'" in r.stderr, r.stderr[-1500:]


@pytest.mark.slow
def test_smoke_flow_with_benchmarks(prefect_server, tiny_pair, tmp_path):
    """The real DAG: the eval step scores the three models on the bundled tasks, the `benchmarks` artifact
    is on the run page, the manifest records and verifies the table, `kdflow evidence show` prints it,
    and the Logs tab has the progress lines."""
    from flows.distill import distill
    from kd.evidence.manifest import load_manifest
    from kd.evidence.verify import verify_run_dir
    from tests.conftest import smoke_overrides
    from tests.prefect_helpers import artifacts

    cfg = load_config("configs/smoke.yaml", smoke_overrides(tmp_path, steps=8) + [
        "orchestration.refresh_cache=true", f"eval.benchmarks.tasks=[{','.join(TASKS)}]", "eval.benchmarks.limit=12",
        "eval.benchmarks.require_no_regression=true"])
    state = distill(cfg, return_state=True)
    result = state.result(raise_on_failure=False)
    run_dir = tmp_path / "evidence" / load_manifest_name(tmp_path)
    m = load_manifest(run_dir)
    assert verify_run_dir(run_dir) == []
    b = m.eval.benchmarks
    assert {t.task for t in b.tasks} == set(TASKS) | {REFERENCE} and all(t.n_docs <= 12 for t in b.tasks)
    assert b.reference_text == "bundled:bierce" and Path(b.reference_dir, f"{REFERENCE}.yaml").is_file()
    assert {f.id for f in m.falsifiers} >= {NO_REGRESSION_ID}
    assert b.bundled_dir and Path(b.bundled_dir, f"{BPB}.yaml").is_file()
    arts = artifacts(state.state_details.flow_run_id)
    assert "benchmarks" in arts, sorted(arts)
    r = _kdflow("evidence", "show", str(run_dir))
    assert r.returncode in (0, 1) and "benchmarks (lm-eval" in r.stdout and "kdflow_lastword" in r.stdout, r.stderr
    assert isinstance(result, dict) or state.is_failed()  # the no-regression gate may fail on 12 MC items


def load_manifest_name(tmp_path: Path) -> str:
    [d] = [p.name for p in (tmp_path / "evidence").iterdir() if p.is_dir()]
    return d


def test_paired_benchmark_difference_pairs_documents():
    rng = np.random.default_rng(0)
    hard = rng.uniform(0, 1, 200)  # what the two students share (a hard document is hard for both) cancels
    kd = {i: float(hard[i] > 0.3) for i in range(200)}
    same = paired_benchmark_difference(kd, dict(kd), "acc", iters=500)
    assert same.difference == 0 and same.low == 0 and same.high == 0 and same.documents == 200
    ctl = {i: float(hard[i] > 0.5) for i in range(200)}  # the control gets a subset right: KD ahead on ~40 docs
    d = paired_benchmark_difference(kd, ctl, "acc", iters=2000)
    assert d.difference == pytest.approx(np.mean([kd[i] - ctl[i] for i in range(200)]))
    assert 0 < d.low < d.difference < d.high
    # bits per byte: each arm's ratio of summed log-likelihood to summed bytes, the same documents resampled
    ll_kd = {i: (-float(b) * 1.0, float(b)) for i, b in enumerate(rng.integers(10, 90, 50))}
    ll_ctl = {i: (v[0] * 1.2, v[1]) for i, v in ll_kd.items()}
    b = paired_benchmark_difference(ll_kd, ll_ctl, "bits_per_byte", iters=500)
    assert b.kd == pytest.approx(1 / np.log(2)) and b.control == pytest.approx(1.2 / np.log(2))
    assert b.high < 0 and b.high - b.low < 1e-9  # every document 20 % worse for the control: no spread
    assert paired_benchmark_difference({0: 1.0}, {0: 0.0}, "acc", iters=500) is None  # one document: no interval
    only_one = paired_benchmark_difference({0: 1.0, 1: 0.0}, {5: 1.0, 6: 1.0}, "acc", iters=500)
    assert only_one is None  # no document scored by both: nothing to pair


def test_a_control_model_gets_a_paired_column(prepared, tiny_pair):
    teacher, rand, trained, teacher_dir, student_dir = three_models(tiny_pair)
    cfg = BenchmarksConfig(tasks=[BPB], limit=12)
    report = run_benchmarks({"student_after": trained, "control": rand},
                            {"student_after": student_dir, "control": student_dir},
                            cfg, bundled_dir=write_bundled_tasks(prepared.path, student_dir), log=lambda _: None)
    [row] = [s for s in report.scores if s.metric == "bits_per_byte"]
    d = row.kd_minus_control
    assert d is not None and d.documents == 12
    assert d.difference == pytest.approx(row.values["student_after"] - row.values["control"], rel=1e-6)
    assert d.high < 0  # the trained student beats a randomly re-initialised one on every resample
    assert "KD − control" in benchmarks_markdown(report)


def test_chat_data_is_scored_on_its_answers_and_an_empty_task_is_refused(tiny_pair, tmp_path):
    """Chat conversations share a template's system prompt and markup: decontamination and the bpb passages read
    the trained (assistant) tokens, else every held-out conversation looks copied from training (a real recipe
    run got 0 kdflow_bpb items and died in lm-eval with a bare StopIteration)."""
    import shutil

    from kd.errors import DataError
    from kd.evaluate.benchmarks import score_benchmarks
    from tests.test_prepare import CHATML

    student = tmp_path / "student"
    shutil.copytree(tiny_pair[1], student)
    (student / "chat_template.jinja").write_text(CHATML)
    system = "You are a careful assistant who answers every question about numbers and colours in full sentences."
    rows = [{"messages": [{"role": "system", "content": system},
                          {"role": "user", "content": f"question {i}: what comes after {i}?"},
                          {"role": "assistant", "content": f"The number after {i} is {i + 1}, and {i} {'is' if i % 2 else 'is not'} odd."}]}
            for i in range(60)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/smoke.yaml", [f"data.source={src}", "data.format=chat", "data.seq_len=256",
                                             "data.heldout_fraction=0.2", f"data.prepared_dir={tmp_path / 'prep'}"])
    prep = prepare_data(cfg.data, student)
    info = bundled_info(write_bundled_tasks(prep.path, student))
    assert info["docs"][BPB] > 0 and info["items_found_in_training_dropped"] == 0, info
    passages = [json.loads(x)["text"] for x in (Path(prep.path) / "lm-eval-tasks-v4" / f"{BPB}.jsonl").read_text().splitlines()]
    assert passages and not any("careful assistant" in p or "question" in p for p in passages)  # answers only
    assert all(p.startswith("The number after") for p in passages)
    # a task with no items is refused by name before lm-eval runs
    bench = BenchmarksConfig(tasks=[BPB])
    ev = cfg.eval.model_copy(update={"benchmarks": bench})
    (Path(prep.path) / "lm-eval-tasks-v4" / "tasks.json").write_text(json.dumps({**info, "docs": {**info["docs"], BPB: 0}}))
    with pytest.raises(DataError, match=rf"eval.benchmarks.tasks: {BPB} got no items from the held-out split"):
        score_benchmarks({"student_after": None}, {"student_after": str(student)}, ev, student_dir=student,
                         heldout_path=prep.path)
