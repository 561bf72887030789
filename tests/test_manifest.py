"""Evidence folders: complete, verifiable, tamper-evident, secret-free, and never a fake pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import kd.evidence.manifest as km
from kd.config import RunConfig
from kd.evidence.manifest import Manifest, git_info, load_manifest, manifest_json_schema, write_evidence
from kd.evidence.verdicts import training_falsifiers
from kd.evidence.verify import verify_run_dir
from kd.evidence.view import diff_runs, show_run
from kd.evidence.redact import is_secret_key, redact, scrub
from kd.results import (
    EvalReport, Falsifier, ModelEval, ModelSnapshot, PreflightReport, TrainResult, VocabAlignment,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SECRET = "hf_TESTtokenValue0123456789abcdefXYZ"


def _ev(loss, kl, share=0.2) -> ModelEval:
    import math

    return ModelEval(loss=loss, perplexity=math.exp(loss), kl_to_teacher=kl, top1_agreement=None if kl is None else 0.4,
                     entropy=2.5, top_token_share=share, tokens=496)


def _eval_report(after_kl=1.2) -> EvalReport:
    from kd.evaluate import eval_gates
    from kd.config import EvalConfig

    t, b, a = _ev(0.6, None), _ev(5.9, 5.2), _ev(3.5, after_kl)
    return EvalReport(teacher=t, student_before=b, student_after=a, vocab_size=360,
                      gates=eval_gates(t, b, a, 360, EvalConfig()))


@pytest.fixture
def inputs(tmp_path, tiny_pair):
    """Everything write_evidence needs, as a finished training run would leave it in its work dir."""
    teacher_dir, student_dir = tiny_pair
    work = tmp_path / "runs" / "r1"
    ckpt = work / "checkpoints" / "step-000010"
    shutil.copytree(student_dir, ckpt)
    (ckpt / "trainer_state.pt").write_bytes(b"optimizer state stays in the work dir")
    rows = [{"step": s, "loss": 6.0 - 0.3 * s, "ce": 6.2 - 0.3 * s, "kd": 5.0 - 0.25 * s, "lr": 1e-3} for s in range(1, 11)]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "train.log").write_text("step 1 loss=5.7\nstep 10 loss=3.0\n")
    training = TrainResult(
        run_dir=str(work), checkpoint_dir=str(ckpt), checkpoint_sha256=km.dir_sha256(ckpt),
        metrics_path=str(work / "metrics.jsonl"), log_path=str(work / "train.log"),
        heldout_path=str(work / "heldout.safetensors"), steps=10, tokens=5040,
        initial_loss=6.0, final_loss=3.0, tokens_per_s=1000.0, wall_s=5.0, peak_memory_bytes=1 << 28,
        device="cpu", dtype="float32",
    )

    def snap(role, d):
        files = {p.name: km.sha256_file(p) for p in sorted(Path(d).iterdir()) if p.is_file()}
        return ModelSnapshot(role=role, repo="tiny:" + role, revision="main", kind="tiny", resolved_commit="local",
                             local_dir=str(d), files=files, total_bytes=sum(p.stat().st_size for p in Path(d).iterdir()))

    return dict(
        config=RunConfig.model_validate({"name": "r1", "teacher": {"repo": "tiny:teacher"},
                                         "student": {"repo": "tiny:student"}, "train": {"steps": 10, "lr": 1e-3}}),
        preflight=PreflightReport(ok=True, python="3.11", torch="2", transformers="5", huggingface_hub="1",
                                  device="cpu", cuda_available=False, bf16_supported=False, free_disk_bytes=1 << 40,
                                  needed_disk_bytes=1 << 20, memory_estimate_bytes=1 << 28),
        models={"teacher": snap("teacher", teacher_dir), "student": snap("student", student_dir)},
        vocab=VocabAlignment(verdict="teacher-padded", teacher_rows=400, student_rows=384, teacher_tokenizer_size=376,
                             student_tokenizer_size=360, rows_kept=384, valid_vocab=360, dropped_mass_mean=1e-5,
                             dropped_mass_max=1e-4),
        training=training,
        eval_report=_eval_report(),
        falsifiers=None,
        flow_run_id="0b5e-flow-run",
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/0b5e-flow-run",
        start=T0,
        end=T0 + timedelta(seconds=42),
    )


@pytest.fixture
def run_dir(tmp_path, inputs):
    d = tmp_path / "evidence" / "r1"
    write_evidence(d, **inputs)
    return d


def test_healthy_run_writes_complete_verifiable_evidence(run_dir):
    raw = json.loads((run_dir / "manifest.json").read_text())
    # Issue 2's contract, as keys of the file itself.
    for key in ("schema_version", "run", "config", "environment", "code", "models", "vocab", "training", "eval",
                "falsifiers", "files", "preflight"):
        assert key in raw, key
    for key in ("name", "flow_run_id", "start", "end", "status"):
        assert key in raw["run"]
    for key in ("steps", "initial_loss", "final_loss", "tokens", "wall_s"):
        assert key in raw["training"]
    assert raw["run"]["status"] == "pass"
    assert {"git_commit", "dirty"} <= set(raw["code"])
    assert {"python", "torch", "transformers", "prefect", "device"} <= set(raw["environment"])
    assert raw["config"]["train"]["lr"] == 1e-3
    ids = {f["id"]: f["verdict"] for f in raw["falsifiers"]}
    assert ids == {"F-DISTILL-SMOKE-001": "pass", "F-DISTILL-VOCAB-001": "pass", "F-DISTILL-FINITE-001": "pass",
                   "F-DISTILL-UNIFORM-001": "pass", "F-DISTILL-COLLAPSE-001": "pass", "F-DISTILL-EVAL-001": "pass"}
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert set(raw["files"]) == on_disk - {"manifest.json"}
    assert {"train.log", "metrics.jsonl", "eval.json", "loss_curve.png", "checkpoint/model.safetensors",
            "checkpoint/tokenizer.json"} <= set(raw["files"])
    assert "checkpoint/trainer_state.pt" not in raw["files"]  # no optimizer pickles in evidence
    assert raw["checkpoint"]["in_evidence"] and raw["checkpoint"]["path"] == "checkpoint"
    assert verify_run_dir(run_dir) == []
    assert EvalReport.model_validate_json((run_dir / "eval.json").read_text()).passed


def test_manifest_validates_against_its_json_schema(run_dir):
    jsonschema = pytest.importorskip("jsonschema")
    schema = manifest_json_schema()
    assert {"run", "files", "falsifiers"} <= set(schema["properties"])
    jsonschema.validate(json.loads((run_dir / "manifest.json").read_text()), schema)


def test_tampered_byte_is_named(run_dir):
    p = run_dir / "metrics.jsonl"
    data = bytearray(p.read_bytes())
    data[10] ^= 0x01
    p.write_bytes(bytes(data))
    problems = verify_run_dir(run_dir)
    assert len(problems) == 1 and problems[0].startswith("metrics.jsonl: sha256 mismatch")


def test_missing_and_extra_files_are_named(run_dir):
    (run_dir / "eval.json").unlink()
    (run_dir / "checkpoint" / "notes.txt").write_text("added later")
    problems = verify_run_dir(run_dir)
    assert "eval.json: missing" in problems
    assert any(p.startswith("checkpoint/notes.txt: extra file") for p in problems)
    assert len(problems) == 2


def test_manifest_edited_to_claim_pass_does_not_validate(run_dir, inputs, tmp_path):
    d = tmp_path / "evidence" / "bad"
    m = write_evidence(d, **{**inputs, "eval_report": _eval_report(after_kl=9.0)})  # KL got worse
    assert m.run.status == "fail" and verify_run_dir(d) == []  # a failed run's evidence is intact
    raw = json.loads((d / "manifest.json").read_text())
    raw["run"]["status"] = "pass"
    (d / "manifest.json").write_text(json.dumps(raw))
    problems = verify_run_dir(d)
    assert len(problems) == 1 and problems[0].startswith("manifest.json") and "F-DISTILL-EVAL-001" in problems[0]
    (run_dir / "manifest.json").write_text("{not json")
    assert verify_run_dir(run_dir)[0].startswith("manifest.json: does not validate")
    (run_dir / "manifest.json").unlink()
    assert verify_run_dir(run_dir) == ["manifest.json: missing (not an evidence folder, or the run crashed before "
                                       "writing it)"]


def test_loss_curve_is_a_real_png(run_dir):
    import matplotlib.image as mpimg

    p = run_dir / "loss_curve.png"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert p.stat().st_size > 10_000
    img = mpimg.imread(p)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas: lines and text were drawn


def test_loss_curve_survives_odd_metrics(tmp_path):
    from kd.plots import plot_loss_curve, read_metrics

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 5.0, "ce": 5.5, "kd": 4.0}\n\n{"step": 2, "loss": NaN, "ce": 5.0}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(m)] == [1, 2]  # the line cut by a crash is skipped
    for src in (m, tmp_path / "empty.jsonl"):
        src.touch()
        out = plot_loss_curve(src, tmp_path / f"{src.stem}.png")
        assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5_000


def test_secrets_appear_nowhere_in_the_run_folder(tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_another-secret-value-42")
    work_log = Path(inputs["training"].log_path)
    work_log.write_text(f"loading with token {SECRET}\nkey pnu_another-secret-value-42\nstep 10 loss=3.0\n")
    extra = tmp_path / "debug.txt"
    extra.write_text(f"HF_TOKEN={SECRET}\n")
    d = tmp_path / "evidence" / "secret"
    m = write_evidence(d, **inputs, extra_files={"debug/debug.txt": extra})
    assert "HF_TOKEN" not in m.environment.env and "PREFECT_API_KEY" not in m.environment.env  # allowlist only
    files = [p for p in d.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data, p
        assert b"pnu_another-secret-value-42" not in data, p
    assert "***" in (d / "train.log").read_text() and "step 10 loss=3.0" in (d / "train.log").read_text()
    assert verify_run_dir(d) == []


def test_redaction_rules():
    got = redact({"hf_token": "abc", "max_tokens": 512, "tokenizer_class": "Qwen2Tokenizer",
                  "nested": [{"client_secret": "s3"}], "db_password": "pw", "OPENAI_API_KEY": "k", "name": "x"})
    assert got == {"hf_token": "***", "max_tokens": 512, "tokenizer_class": "Qwen2Tokenizer",
                   "nested": [{"client_secret": "***"}], "db_password": "***", "OPENAI_API_KEY": "***", "name": "x"}
    assert is_secret_key("HF_TOKEN") and not is_secret_key("tokenizer_config")
    assert scrub("a hf_abcdefgh b", {"hf_abcdefgh"}) == "a *** b"


def test_crash_before_the_manifest_lands_leaves_no_pass(run_dir, inputs, monkeypatch):
    assert load_manifest(run_dir).run.status == "pass"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_evidence(run_dir, **inputs)  # a retry into the same folder crashes at the last step
    monkeypatch.undo()
    assert not (run_dir / "manifest.json").exists()  # the old "pass" was removed before anything changed
    assert not list(run_dir.glob(".manifest.json*"))  # and no half-written temp file is left
    assert verify_run_dir(run_dir)[0].startswith("manifest.json: missing")


def test_status_is_fail_unless_every_falsifier_passes(tmp_path, inputs):
    bad = Falsifier(id="F-EXTRA-001", claim="c", observed="o", verdict="fail")
    m = write_evidence(tmp_path / "e1", **{**inputs, "falsifiers": [bad]})
    assert m.run.status == "fail"
    m = write_evidence(tmp_path / "e2", **{**inputs, "training": None})
    assert m.run.status == "fail" and any("training" in n for n in m.notes)
    Path(inputs["training"].log_path).unlink()  # every gate passes, but the evidence is incomplete
    m3 = write_evidence(tmp_path / "e3", **inputs)
    assert m3.run.status == "fail" and any(n.startswith("train.log") for n in m3.notes)
    assert all(f.verdict == "pass" for f in m3.falsifiers)
    with pytest.raises(ValueError, match="F-EXTRA-001"):
        Manifest.model_validate({**m.model_dump(), "training": inputs["training"].model_dump(),
                                 "falsifiers": [bad.model_dump()], "run": {**m.run.model_dump(), "status": "pass"}})


def test_training_falsifier():
    tr = dict(run_dir="r", checkpoint_dir="c", checkpoint_sha256="0", metrics_path="m", log_path="l", heldout_path="h", steps=3,
              tokens=10, tokens_per_s=1.0, wall_s=1.0, peak_memory_bytes=0, device="cpu", dtype="float32")
    assert training_falsifiers(TrainResult(**tr, initial_loss=5.0, final_loss=4.0))[0].verdict == "pass"
    assert training_falsifiers(TrainResult(**tr, initial_loss=5.0, final_loss=5.0))[0].verdict == "fail"
    assert training_falsifiers(TrainResult(**tr, initial_loss=5.0, final_loss=float("nan")))[0].verdict == "fail"


def test_evidence_checkpoint_loads_and_generates(run_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run_dir / "checkpoint"
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = tok("the teacher", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0]), str)


def test_external_checkpoint_is_recorded_by_path_and_hash(tmp_path, inputs):
    d = tmp_path / "evidence" / "ext"
    write_evidence(d, **inputs)  # a first attempt copied the checkpoint in; the retry keeps it outside
    m = write_evidence(d, **inputs, copy_checkpoint=False)
    src = Path(inputs["training"].checkpoint_dir)
    assert not (d / "checkpoint").exists()
    assert not m.checkpoint.in_evidence and m.checkpoint.path == str(src.resolve())
    assert m.checkpoint.sha256 == km.dir_sha256(src) == inputs["training"].checkpoint_sha256
    assert verify_run_dir(d) == []
    (src / "config.json").write_text("{}")
    assert any("sha256 mismatch" in p and str(src.resolve()) in p for p in verify_run_dir(d))


def test_show_and_diff(run_dir, inputs, tmp_path):
    text = show_run(run_dir)
    assert "run r1: PASS" in text and "F-DISTILL-SMOKE-001" in text and "all sha256 match" in text
    assert "student_after" in text and "flow-run/0b5e-flow-run" in text
    other = tmp_path / "evidence" / "r2"
    cfg2 = inputs["config"].model_copy(update={"name": "r2"})
    cfg2.train.lr = 5e-4
    write_evidence(other, **{**inputs, "config": cfg2, "eval_report": _eval_report(after_kl=9.0)})
    d = diff_runs(run_dir, other)
    assert "train.lr: 0.001 → 0.0005" in d
    assert "eval.student_after.kl_to_teacher: 1.2 → 9" in d and "falsifier.F-DISTILL-EVAL-001: pass → fail" in d
    assert "run.status: pass → fail" in d
    assert "config: no differences" in diff_runs(run_dir, run_dir)


def test_git_info(tmp_path):
    assert git_info(tmp_path) == {"commit": "unknown", "dirty": None}
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    info = git_info(repo)
    assert len(info["commit"]) == 40 and info["dirty"] is False
    (repo / "a.txt").write_text("b")
    assert git_info(repo)["dirty"] is True
