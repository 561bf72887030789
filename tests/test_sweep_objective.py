"""Issue 26: a sweep's objective may be any number of the evidence manifest (read off its schema, checked
here against a real manifest, on-sample metrics included), and every trial's own config is preflighted
before any trial trains (not one config per group of trials sharing models and data)."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.cli import main
from kd.errors import ConfigError
from tests.test_manifest import inputs  # noqa: F401  (fixture)


def _numbers(doc, prefix=""):
    """{dotted path: value} of every number in a JSON document (lists have no dotted path)."""
    out = {}
    for k, v in doc.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_numbers(v, path))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[path] = v
    return out


def _spec(tmp, **over):
    spec = {"name": "obj", "base": "configs/smoke.yaml", "grid": {"kd.alpha": [0.2]},
            "objective": {"metric": "kl", "direction": "min"}, "concurrency": 2,
            "evidence_dir": str(tmp / "evidence"), "work_dir": str(tmp / "runs")}
    spec.update(over)
    return spec


def test_every_number_of_a_real_manifest_can_rank_trials(inputs, tmp_path):  # noqa: F811
    from kd.evidence.manifest import write_evidence
    from kd.results import OnSampleReport, SampleEval
    from kd.sweep.report import objective_value
    from kd.sweep.spec import validate_spec

    side = lambda kl: SampleEval(reverse_kl=kl, teacher_nll=2.0, tokens=40, samples=4, stopped=1)  # noqa: E731
    on_samples = OnSampleReport(before=side(0.9), after=side(0.4), prompts=4, max_new_tokens=10, temperature=1.0,
                                top_p=1.0, seed=3)
    summary = {"settings": {"fraction": 0.5}, "samples": 8, "generated_tokens": 96, "stopped_at_eos": 1,
               "batches": {"off_policy": 6, "on_policy": 4, "seq_kd": 0}, "gen_tokens_per_s": 120.0,
               "gen_share": 0.4, "logged_steps": 10}
    run = tmp_path / "evidence" / "r1"
    write_evidence(run, **{**inputs, "eval_report": inputs["eval_report"].model_copy(update={"on_samples": on_samples}),
                           "training": inputs["training"].model_copy(update={"on_policy": summary})})
    manifest = json.loads((run / "manifest.json").read_text())
    numbers = _numbers(manifest)
    assert numbers["eval.on_samples.after.reverse_kl"] == 0.4  # the path the sweep refused before
    assert {"training.on_policy.gen_tokens_per_s", "eval.student_after.kl_to_teacher", "config.kd.alpha"} <= set(numbers)
    refused = []
    for path, value in numbers.items():
        try:
            validate_spec(_spec(tmp_path, objective={"metric": path, "direction": "min"}))
        except ConfigError as err:
            refused.append(f"{path}: {err}")
            continue
        assert objective_value(manifest, path) == value, path
    assert not refused, refused[:5]


@pytest.mark.parametrize("metric, named", [
    ("eval.on_samples.after.reverse_kll", "not in manifest.json (did you mean eval.on_samples.after.reverse_kl?)"),
    ("eval.on_samples.after", "not a number in manifest.json"),
    ("run.name", "not a number in manifest.json"),
    ("accuracy", "'accuracy' is not in manifest.json"),
])
def test_an_objective_the_manifest_cannot_hold_is_refused_naming_it(tmp_path, capsys, metric, named):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path, objective={"metric": metric, "direction": "min"})))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"objective.metric: unknown metric {metric!r}" in err and named in err, err


def _bad_second_trial(tmp_path):
    """Two trials sharing models and data (one preflight group); only the second one's own config is wrong:
    it resumes from a folder that is not a checkpoint."""
    (tmp_path / "not-a-checkpoint").mkdir()
    return _spec(tmp_path, trials=[{"train.resume_from": str(tmp_path / "not-a-checkpoint")}])


def _nothing_ran(tmp_path) -> bool:
    """Only the empty folders preflight's writability check makes: no trial folder, no file."""
    return all(not any(p.iterdir()) for p in (tmp_path / "evidence" / "obj", tmp_path / "runs" / "obj"))


def test_cli_preflights_every_trial_before_the_sweep_starts(tmp_path, capsys, monkeypatch):
    import flows.sweep

    started = []
    monkeypatch.setattr(flows.sweep, "sweep", lambda spec: started.append(spec) or {})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_bad_second_trial(tmp_path)))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trial obj-resume_from" in err and "train.resume_from" in err and "is not a kdflow checkpoint" in err, err
    assert started == [] and _nothing_ran(tmp_path)  # refused before the sweep flow ran


def test_sweep_flow_preflights_every_trial_before_any_work(tmp_path):
    """The flow itself (as a deployment runs it, without the CLI) refuses the bad trial before shared steps."""
    from flows.sweep import sweep
    from kd.sweep.spec import validate_spec

    with pytest.raises(ConfigError, match=r"trial obj-resume_from.*train.resume_from.*not a kdflow checkpoint"):
        sweep.fn(validate_spec(_bad_second_trial(tmp_path)))
    assert _nothing_ran(tmp_path)
