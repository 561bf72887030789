"""Out-of-domain by default (issue 27.5): eval.reference_text (default bundled:bierce, a source no preset trains
on) is scored as the bundled lm-eval task kdflow_bpb_reference beside the in-domain kdflow_bpb, both with a
per-document bootstrap standard error; the reference's content is in the benchmark cache key; a missing
reference exits 2 naming eval.reference_text."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kd.config import BenchmarksConfig, RunConfig, load_config
from kd.data import prepare_data
from kd.errors import ConfigError, DataError
from kd.evaluate.benchmarks import (benchmarks_markdown, bootstrap_stderr, check_reference, definitions_fingerprint,
                                    domain_line, run_benchmarks, scored_tasks)
from kd.evaluate.bundled_tasks import (BPB, REFERENCE, REFERENCE_MAX_PASSAGES, bundled_info, reference_documents,
                                       reference_files, training_texts, words, write_bundled_tasks,
                                       write_reference_task)

DEFAULT = RunConfig.model_fields["eval"].default_factory().reference_text


@pytest.fixture(scope="module")
def prepared(tiny_pair, tmp_path_factory):
    cfg = load_config("configs/smoke.yaml", [f"data.prepared_dir={tmp_path_factory.mktemp('prep')}"])
    return prepare_data(cfg.data, tiny_pair[1])


def test_the_default_reference_is_bundled_and_not_what_presets_train_on():
    from pathlib import Path

    assert DEFAULT == "bundled:bierce"
    [f] = reference_files(DEFAULT)
    assert f.name == "devils-dictionary.txt" and (f.parent / "SOURCE.md").is_file()
    docs = reference_documents([f])
    assert len(docs) > 900 and docs[0].startswith("ABASEMENT, n.")
    sources = {load_config(p).data.source for p in sorted(Path("configs").glob("*.yaml"))}
    assert not any("bierce" in s for s in sources), sources
    # scored whenever benchmarks run, and only then; listed explicitly it is not added twice
    assert scored_tasks(BenchmarksConfig(tasks=[BPB]), DEFAULT) == [BPB, REFERENCE]
    assert scored_tasks(BenchmarksConfig(tasks=[]), DEFAULT) == []
    assert scored_tasks(BenchmarksConfig(tasks=[BPB]), None) == [BPB]
    assert scored_tasks(BenchmarksConfig(tasks=[REFERENCE, BPB]), DEFAULT) == [REFERENCE, BPB]


def test_reference_passages_are_reference_text_and_not_training_text(prepared, tiny_pair, tmp_path):
    folder = write_reference_task(prepared.path, tiny_pair[1], DEFAULT)
    assert folder == write_reference_task(prepared.path, tiny_pair[1], DEFAULT)  # built once, content-addressed
    info = bundled_info(folder)
    rows = [json.loads(x)["text"] for x in (folder / f"{REFERENCE}.jsonl").read_text().splitlines()]
    assert info["docs"] == {REFERENCE: len(rows)} and 0 < len(rows) <= REFERENCE_MAX_PASSAGES
    assert f"test: {folder.resolve() / (REFERENCE + '.jsonl')}" in (folder / f"{REFERENCE}.yaml").read_text()
    assert "output_type: loglikelihood_rolling" in (folder / f"{REFERENCE}.yaml").read_text()
    bierce = " ".join(" ".join(words(d)) for d in reference_documents(reference_files(DEFAULT)))
    assert all(" ".join(words(r)) in bierce for r in rows)  # every passage is reference text...
    train = "\n".join(" ".join(words(t)) for t in training_texts(prepared.path, tiny_pair[1]))
    assert not any(" ".join(words(r)) in train for r in rows)  # ...and none is training text

    # the training text itself as the "reference": every passage is found in training, refused
    same = tmp_path / "trained.txt"
    same.write_text("\n".join(training_texts(prepared.path, tiny_pair[1])) + "\n")
    with pytest.raises(DataError, match="eval.reference_text .* every passage occurs in the training data"):
        write_reference_task(prepared.path, tiny_pair[1], str(same))


def test_reference_scored_beside_in_domain_bpb_with_bootstrap_stderr(prepared, tiny_pair):
    from tests.test_benchmarks import three_models

    teacher, rand, trained, teacher_dir, student_dir = three_models(tiny_pair)
    cfg = BenchmarksConfig(tasks=[BPB], limit=12, bootstrap_iters=200)
    report = run_benchmarks({"teacher": teacher, "student_before": rand, "student_after": trained},
                            {"teacher": teacher_dir, "student_before": student_dir, "student_after": student_dir},
                            cfg, bundled_dir=write_bundled_tasks(prepared.path, student_dir), log=lambda _: None,
                            reference_dir=write_reference_task(prepared.path, student_dir, DEFAULT),
                            reference_text=DEFAULT)
    assert [t.task for t in report.tasks] == [BPB, REFERENCE] and report.reference_text == DEFAULT
    assert {t.task: t.n_docs for t in report.tasks} == {BPB: 12, REFERENCE: 12} and report.tasks[1].bundled
    by = {(s.task, s.metric): s for s in report.scores}
    for task in (BPB, REFERENCE):
        s = by[(task, "bits_per_byte")]
        assert set(s.values) == {"teacher", "student_before", "student_after"}
        for model, se in s.stderr.items():  # lm-eval gives none for bits per byte: kdflow's bootstrap
            assert se is not None and math.isfinite(se) and 0 < se < s.values[model], (task, model, se)
        assert s.retention == pytest.approx(s.values["teacher"] / s.values["student_after"])
        assert by[(task, "byte_perplexity")].stderr["teacher"] > 0
    # the tiny teacher only ever saw the smoke corpus: specialised, it is far worse on the text it never saw
    ind, ood = by[(BPB, "bits_per_byte")].values, by[(REFERENCE, "bits_per_byte")].values
    assert ood["teacher"] > 2 * ind["teacher"] and ood["student_after"] > ind["student_after"]
    line = domain_line(report)
    assert "in-domain" in line and "out-of-domain (bundled:bierce" in line and " ± " in line
    md = benchmarks_markdown(report)
    assert f"| {REFERENCE} | bits_per_byte ↓ |" in md and " ± " in md


def test_bootstrap_stderr_of_a_ratio_of_sums():
    pairs = [(-10.0, 20), (-30.0, 20), (-12.0, 25), (-40.0, 30)]
    se = bootstrap_stderr(pairs, "bits_per_byte", 2000)
    assert se == bootstrap_stderr(pairs, "bits_per_byte", 2000)  # seeded
    assert 0.05 < se < 0.6
    assert bootstrap_stderr([(-10.0, 20)] * 5, "bits_per_byte", 500) == pytest.approx(0, abs=1e-12)
    assert bootstrap_stderr(pairs, "bits_per_byte", 0) is None and bootstrap_stderr(pairs[:1], "bits_per_byte", 99) is None
    assert bootstrap_stderr(pairs, "acc", 100) is None


def test_a_changed_reference_text_is_a_cache_miss(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("The first reference document.\nThe second one.\n")
    cfg = BenchmarksConfig(tasks=[BPB])
    a = definitions_fingerprint(cfg, str(ref))
    assert a == definitions_fingerprint(cfg, str(ref))
    ref.write_text("The first reference document.\nThe second one, edited.\n")
    b = definitions_fingerprint(cfg, str(ref))
    assert a != b
    assert len({b, definitions_fingerprint(cfg, None), definitions_fingerprint(cfg, DEFAULT)}) == 3
    # a folder of files: its content counts too
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "A third document."}) + "\n")
    assert definitions_fingerprint(cfg, str(tmp_path)) != definitions_fingerprint(cfg, str(ref))


def test_bad_reference_text_exits_2_naming_the_field(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    bad = {
        str(tmp_path / "absent.txt"): "eval.reference_text",
        "bundled:nope": "eval.reference_text 'bundled:nope': no bundled data 'nope'",
        str(tmp_path): "eval.reference_text",  # a folder without text files
        "bundled:english": "eval.reference_text 'bundled:english' is (inside) the training data",
    }
    for ref, msg in bad.items():
        code = main(["run", "configs/smoke.yaml", "--dry-run", "--set", f"eval.reference_text={ref}",
                     "--set", "data.source=bundled:english"])
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (ref, err[-800:])
    with pytest.raises(ConfigError, match="eval.reference_text"):
        check_reference(str(tmp_path / "absent.txt"))
    # null: no out-of-domain text; the default preflights, and the plan counts its passages
    assert main(["run", "configs/smoke.yaml", "--dry-run", "--set", "eval.reference_text=null"]) == 0
    capsys.readouterr()
    assert main(["run", "configs/smoke.yaml", "--dry-run", "--set", f"eval.benchmarks.tasks=[{BPB}]",
                 "--set", "eval.benchmarks.limit=30"]) == 0
    out = capsys.readouterr().out
    assert "[ok] reference-text" in out and f"{REFERENCE} ~30 docs" in out, out[-1500:]


def test_config_refuses_the_reference_task_without_a_reference():
    with pytest.raises(ValueError, match="kdflow_bpb_reference but eval.reference_text is null"):
        RunConfig.model_validate({**_smoke(), "eval": {"reference_text": None, "benchmarks": {"tasks": [REFERENCE]}}})
    # a ship threshold may name the reference task: it is scored whenever benchmarks run
    RunConfig.model_validate({**_smoke(), "eval": {"benchmarks": {"tasks": [BPB]},
                                                   "ship": {"min_retention": {f"{REFERENCE}/bits_per_byte": 0.9}}}})


def _smoke() -> dict:
    return load_config("configs/smoke.yaml").model_dump(mode="json", exclude={"eval"})


def test_the_eval_step_adds_the_reference_whenever_benchmarks_run(prepared, tiny_pair):
    """kd's side of the `evaluate` task: benchmark_eval writes and scores kdflow_bpb_reference beside the listed
    tasks by default, and not with eval.reference_text null."""
    from backends import get_backend
    from kd.config import EvalConfig
    from kd.evaluate.benchmarks import benchmark_eval
    from tests.test_manifest import _eval_report

    teacher_dir, student_dir = map(str, tiny_pair)
    be = get_backend("hf")
    models = {n: be.load(d, device="cpu", dtype=torch.float32, trust_remote_code=False)
              for n, d in (("teacher", teacher_dir), ("student_after", student_dir))}
    dirs = {"teacher": teacher_dir, "student_before": student_dir, "student_after": student_dir}
    logs: list[str] = []
    ev = EvalConfig(benchmarks={"tasks": [BPB], "limit": 4, "bootstrap_iters": 50})
    rep = benchmark_eval(_eval_report(), models, dirs, ev, heldout_path=prepared.path, log=logs.append).benchmarks
    assert [t.task for t in rep.tasks] == [BPB, REFERENCE] and rep.reference_text == DEFAULT
    assert any("out-of-domain (bundled:bierce" in line for line in logs), logs
    off = ev.model_copy(update={"reference_text": None})
    rep = benchmark_eval(_eval_report(), models, dirs, off, heldout_path=prepared.path, log=logs.append).benchmarks
    assert [t.task for t in rep.tasks] == [BPB] and rep.reference_text is None
