"""Issue 9: evidence that cannot lie. Forged verdicts fail `verify` (recomputed from the numbers),
edited numbers fail `verify --pubkey` (Ed25519), and the CLI's evidence commands agree on exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from kd.evidence.manifest import write_evidence
from kd.evidence.verify import verify_run_dir
from kd.results import TrainResult
from kd.evidence.signing import check_signature, sign_run
from tests.test_manifest import _eval_report, inputs, run_dir  # noqa: F401  (fixtures)


def _edit(run: Path, fn) -> None:
    raw = json.loads((run / "manifest.json").read_text())
    fn(raw)
    (run / "manifest.json").write_text(json.dumps(raw, indent=2))


@pytest.fixture
def nan_run(tmp_path, inputs):  # noqa: F811
    """A run whose recorded final loss is NaN: written as `fail`."""
    training: TrainResult = inputs["training"]
    d = tmp_path / "evidence" / "nan"
    m = write_evidence(d, **{**inputs, "training": training.model_copy(update={"final_loss": float("nan")})})
    assert m.run.status == "fail" and verify_run_dir(d) == []
    return d


def test_status_only_forgery_fails_verify_and_show(nan_run, capsys):
    _edit(nan_run, lambda raw: raw["run"].update(status="pass"))
    assert main(["evidence", "verify", str(nan_run)]) == 1
    err = capsys.readouterr().err
    assert "F-DISTILL-SMOKE-001" in err and "run.status is pass" in err
    assert main(["evidence", "show", str(nan_run)]) == 1
    out = capsys.readouterr()
    assert "PASS" not in out.out + out.err


def test_status_and_verdict_forgery_fails_verify_naming_the_falsifier(nan_run, capsys):
    def forge(raw):
        raw["run"]["status"] = "pass"
        for f in raw["falsifiers"] + raw["eval"]["gates"]:
            f["verdict"] = "pass"

    _edit(nan_run, forge)
    assert json.loads((nan_run / "manifest.json").read_text())["training"]["final_loss"] == "NaN"
    assert main(["evidence", "verify", str(nan_run)]) == 1
    err = capsys.readouterr().err
    assert "F-DISTILL-SMOKE-001: manifest says pass, the recorded numbers say fail" in err
    assert main(["evidence", "show", str(nan_run)]) == 1
    out = capsys.readouterr().out
    status_line = out.splitlines()[0]
    assert "PASS" not in status_line and status_line.startswith("run r1: FAIL")
    assert "[FAIL] F-DISTILL-SMOKE-001" in out


def test_edited_eval_numbers_are_caught_without_a_key(run_dir):  # noqa: F811
    """Manifest eval numbers edited (eval.json left alone): they no longer match the hashed file."""
    _edit(run_dir, lambda raw: raw["eval"]["student_after"].update(kl_to_teacher=0.01))
    assert "eval.json: its numbers differ from the manifest's eval" in verify_run_dir(run_dir)


def test_signed_run_with_edited_numbers_fails_verify_pubkey(run_dir, tmp_path, capsys):  # noqa: F811
    key, pub = tmp_path / "keys" / "k.pem", tmp_path / "keys" / "k.pub.pem"
    assert main(["evidence", "keygen", str(key)]) == 0 and pub.is_file()
    assert (key.stat().st_mode & 0o077) == 0  # the private key is not readable by others
    assert main(["evidence", "sign", str(run_dir), "--key", str(key)]) == 0
    assert main(["evidence", "verify", str(run_dir), "--pubkey", str(pub)]) == 0
    # re-indenting is not an edit: the signature is over canonical JSON
    raw = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps(raw))
    assert check_signature(run_dir, pub) == []
    # a forger edits numbers consistently: training loss and verdicts agree, so only the signature catches it
    _edit(run_dir, lambda raw: raw["training"].update(initial_loss=60.0))
    assert verify_run_dir(run_dir) == []
    capsys.readouterr()
    assert main(["evidence", "verify", str(run_dir), "--pubkey", str(pub)]) == 1
    assert "manifest.sig: signature does not match manifest.json" in capsys.readouterr().err
    assert main(["evidence", "verify", str(run_dir)]) == 1  # the key it carries catches the edit too
    # ... and re-signing with another key does not fool --pubkey
    other, _ = tmp_path / "o.pem", main(["evidence", "keygen", str(tmp_path / "o.pem")])
    sign_run(run_dir, other)
    assert check_signature(run_dir) == []
    assert "not by the given key" in check_signature(run_dir, pub)[0]


def test_unsigned_run_fails_verify_pubkey_and_new_manifest_drops_old_signature(run_dir, inputs, tmp_path):  # noqa: F811
    main(["evidence", "keygen", str(tmp_path / "k.pem")])
    pub = tmp_path / "k.pub.pem"
    assert check_signature(run_dir, pub) == ["manifest.sig: missing (the run is not signed)"]
    sign_run(run_dir, tmp_path / "k.pem")
    assert verify_run_dir(run_dir) == []  # manifest.sig is the one file the manifest does not list
    write_evidence(run_dir, **inputs)
    assert not (run_dir / "manifest.sig").exists()


def test_sign_refuses_a_run_that_does_not_verify(run_dir, tmp_path, capsys):  # noqa: F811
    main(["evidence", "keygen", str(tmp_path / "k.pem")])
    (run_dir / "metrics.jsonl").write_text("tampered\n")
    assert main(["evidence", "sign", str(run_dir), "--key", str(tmp_path / "k.pem")]) == 1
    assert not (run_dir / "manifest.sig").exists() and "metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["verify", "show", "sign"])
def test_missing_folder_exits_2_for_every_evidence_command(action, tmp_path, capsys):
    extra = ["--key", str(tmp_path / "k.pem")] if action == "sign" else []
    assert main(["evidence", action, str(tmp_path / "nope"), *extra]) == 2
    assert "nope: run folder not found" in capsys.readouterr().err


def test_smoke_steps_zero_is_an_error(capsys, tmp_path):
    assert main(["smoke", "--steps", "0", "--evidence-dir", str(tmp_path)]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_existing_run_name_is_refused_before_any_work(run_dir, tmp_path, capsys):  # noqa: F811
    evidence_dir = run_dir.parent
    assert main(["smoke", "--evidence-dir", str(evidence_dir), "--set", "name=r1",
                 "--set", f"work_dir={tmp_path / 'runs-x'}"]) == 2
    err = capsys.readouterr().err
    assert f"run folder {run_dir} already exists" in err and not (tmp_path / "runs-x").exists()


def test_long_messages_are_truncated(tmp_path, capsys):
    assert main(["run", "configs/smoke.yaml", "--set", "kd.divergence=" + "y" * 5000]) == 2
    err = capsys.readouterr().err
    assert len(err) < 2000 and "truncated" in err


def test_flow_run_url_is_null_without_a_ui_url(tmp_path, inputs):  # noqa: F811
    """Prefect's flow_run.ui_url is "None/flow-runs/..." when no UI URL is configured: stored as null."""
    m = write_evidence(tmp_path / "e", **{**inputs, "flow_run_url": "None/flow-runs/flow-run/0b5e"})
    assert m.run.flow_run_url is None and json.loads((tmp_path / "e" / "manifest.json").read_text())["run"]["flow_run_url"] is None


def test_run_folders_are_never_reused(tmp_path):
    """The flow's rule (deployments too): an explicit name that exists is refused, a generated one gets a suffix."""
    from kd.config import RunConfig
    from kd.errors import ConfigError
    from kd.evidence.manifest import claim_run_name

    base = {"teacher": {"repo": "tiny:teacher"}, "student": {"repo": "tiny:student"},
            "evidence_dir": str(tmp_path / "ev"), "work_dir": str(tmp_path / "runs")}
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    assert claim_run_name(RunConfig.model_validate({**base, "name": "r1"}), "r1", suffix="abc") == "r1"  # empty: free
    (tmp_path / "runs" / "r1" / "metrics.jsonl").write_text("{}\n")  # an earlier run's work folder
    with pytest.raises(ConfigError, match=r"name: run folder .*runs/r1 already exists"):
        claim_run_name(RunConfig.model_validate({**base, "name": "r1"}), "r1", suffix="abc")
    assert claim_run_name(RunConfig.model_validate(base), "r1", suffix="abc") == "r1-abc"
