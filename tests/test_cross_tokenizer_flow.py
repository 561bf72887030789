"""The cross-tokenizer preset through the CLI and the Prefect flow (issue 30): SmolLM2-135M-Instruct teaching a
10-layer pruned copy transplanted onto GPT-2's tokenizer. Wiring only: what each step records, not whether the
student learned (the bits-per-byte gate's verdict is recorded and recomputed, not asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flows.cli import main
from kd.evaluate.gates import BPB_ID, GROUP_KL_ID, KL_ID

PRESET = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-cross-tokenizer.yaml"


def test_cross_tokenizer_preset_end_to_end(tmp_path, prefect_server, capsys):
    code = main(["run", str(PRESET), "--evidence-dir", str(tmp_path / "ev"), "--set", f"work_dir={tmp_path}/runs",
                 "--set", "train.steps=4"])
    out = capsys.readouterr()
    assert code in (0, 1), out.err[-3000:]  # 1: a gate failed (evidence written first); anything else is a crash
    (run_dir,) = (tmp_path / "ev").iterdir()
    m = json.loads((run_dir / "manifest.json").read_text())
    vocab = m["vocab"]
    assert vocab["verdict"] == "cross-tokenizer"
    assert (vocab["teacher_tokenizer_size"], vocab["student_tokenizer_size"]) == (49152, 50257)
    stats = vocab["cross_tokenizer"]
    assert stats["groups"] > 0 and 0 < stats["one_to_one_share"] <= 1 and 0 < stats["teacher_matched_mass_mean"] <= 1
    assert stats["exact_match"]["matched"] > 0
    assert m["models"]["student"]["init"]["tokenizer"]["new_vocab"] == 50257
    ev = m["eval"]
    assert ev["cross_tokenizer"] is True
    for row in ("teacher", "student_before", "student_after"):
        assert math.isfinite(ev[row]["bits_per_byte"]) and ev[row]["kl_to_teacher"] is None
    for row in ("student_before", "student_after"):  # the KL and agreement restated on byte-aligned groups
        assert ev[row]["groups"] > 0 and ev[row]["group_kl_to_teacher"] > 0
        assert 0 <= ev[row]["group_top1_agreement"] <= 1
    assert ev["teacher"]["group_kl_to_teacher"] is None
    ids = [f["id"] for f in m["falsifiers"]]
    assert BPB_ID in ids and GROUP_KL_ID in ids and KL_ID not in ids
    assert (code == 0) == all(f["verdict"] == "pass" for f in m["falsifiers"])
    assert main(["evidence", "verify", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["evidence", "show", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "group KL" in shown and "bits/byte" in shown and GROUP_KL_ID in shown
