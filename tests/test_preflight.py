"""Preflight: sizes from config or the hub listing, disk and path checks, and the dry-run plan."""

from pathlib import Path

import pytest
import torch

from kd.config import load_config
from kd.preflight import estimate_params, format_plan, run_preflight


def _cfg(tmp_path, *overrides):
    return load_config("configs/smoke.yaml", [f"work_dir={tmp_path}/runs", f"evidence_dir={tmp_path}/ev", *overrides])


def test_local_models_are_sized_from_config(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    report = run_preflight(_cfg(tmp_path, f"teacher.repo={teacher}", f"student.repo={student}"))
    assert report.ok
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(student).parameters())
    assert abs(report.plan["student"]["params"] - real) / real < 0.02
    assert report.memory_estimate_bytes > real * 16


def test_the_first_plan_sizes_tiny_models_not_generated_yet(tmp_path, tiny_pair, monkeypatch):
    """Issue 21.4: on a fresh KDFLOW_HOME the tiny models are made after the plan; the plan must still
    give their real size and vocab (the config make_tiny will use), not `params ~?, vocab ?`."""
    import json

    monkeypatch.setenv("KDFLOW_HOME", str(tmp_path / "fresh-home"))
    report = run_preflight(_cfg(tmp_path))
    assert not (tmp_path / "fresh-home" / "tiny").exists()  # sized without generating anything
    plan = format_plan(report)
    assert "~?" not in plan and "vocab ?" not in plan, plan
    for role, folder in zip(("teacher", "student"), tiny_pair):
        made = json.loads((folder / "config.json").read_text())  # the pair generated for the session
        assert report.plan[role]["vocab_size"] == made["vocab_size"]
        assert report.plan[role]["params"] == estimate_params(made)


def test_qwen_parameter_estimate_matches_published_size():
    qwen05 = {"hidden_size": 896, "vocab_size": 151936, "num_hidden_layers": 24, "intermediate_size": 4864,
              "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}
    assert 0.48e9 < estimate_params(qwen05) < 0.50e9  # Qwen2.5-0.5B: 494M parameters


def test_hub_models_are_sized_from_the_listing(hub, tmp_path, tiny_pair):
    teacher, student = tiny_pair
    hub.add_repo("org/teacher", teacher)
    hub.add_repo("org/student", student)
    report = run_preflight(_cfg(tmp_path, "teacher.repo=org/teacher", "student.repo=org/student"))
    expected = sum(p.stat().st_size for p in Path(teacher).iterdir() if p.is_file())
    assert report.plan["teacher"]["download_bytes"] == expected
    assert report.needed_disk_bytes >= expected
    assert not hub.requests("GET", "/resolve/")  # sizing downloads nothing


def test_unwritable_evidence_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    report = run_preflight(_cfg(tmp_path, f"evidence_dir={blocker}/ev"))
    assert not report.ok
    bad = [c for c in report.checks if not c["ok"]]
    assert [c["name"] for c in bad] == ["writable-evidence_dir"] and str(blocker) in bad[0]["detail"]
    assert "[FAIL] writable-evidence_dir" in format_plan(report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_on_a_cpu_machine_fails(tmp_path):
    report = run_preflight(_cfg(tmp_path, "train.device=cuda"))
    assert not report.ok and any(c["name"] == "cuda" and not c["ok"] for c in report.checks)
