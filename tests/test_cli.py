"""The `kdflow` command: exit codes and messages a user sees."""

import pytest

from flows.cli import main


def test_bad_value_exits_2_naming_the_field(capsys):
    assert main(["run", "configs/smoke.yaml", "--set", "kd.temperature=-1"]) == 2
    err = capsys.readouterr().err
    assert "kd.temperature" in err and "must be > 0" in err


def test_unknown_field_exits_2(capsys):
    assert main(["run", "configs/smoke.yaml", "--set", "train.stpes=3"]) == 2
    assert "train.stpes: unknown field" in capsys.readouterr().err


def test_missing_local_model_folder_exits_2(capsys, tmp_path):
    code = main(["run", "configs/smoke.yaml", "--dry-run", "--set", f"student.repo={tmp_path}/nope/",
                 "--set", f"work_dir={tmp_path}/runs", "--set", f"evidence_dir={tmp_path}/ev"])
    assert code == 2
    err = capsys.readouterr().err
    assert "student folder" in err and f"{tmp_path}/nope" in err and err.count("\n") == 1


def test_dry_run_prints_plan_and_does_nothing(capsys, tmp_path, tiny_pair):
    teacher, student = tiny_pair
    code = main(["run", "configs/smoke.yaml", "--dry-run", "--set", f"teacher.repo={teacher}",
                 "--set", f"student.repo={student}", "--set", f"work_dir={tmp_path}/runs",
                 "--set", f"evidence_dir={tmp_path}/ev"])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("teacher", "student", "steps", "memory", "[ok] disk"):
        assert word in out
    assert not any((tmp_path / "runs").iterdir()) and not any((tmp_path / "ev").iterdir())


@pytest.mark.slow
def test_smoke_command_end_to_end(tmp_path, prefect_server, capsys):
    code = main(["smoke", "--steps", "8", "--evidence-dir", str(tmp_path / "ev"), "--no-cache",
                 "--set", f"work_dir={tmp_path}/runs", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1",
                 "--set", "eval.require_kl_improvement=false"])  # about the command and verify, not learning
    assert code == 0
    (run_dir,) = (tmp_path / "ev").iterdir()
    assert main(["evidence", "verify", str(run_dir)]) == 0
    (run_dir / "metrics.jsonl").write_text("tampered\n")
    assert main(["evidence", "verify", str(run_dir)]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
