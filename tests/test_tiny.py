"""The tiny teacher/student pair: hub-like layout, loads with transformers, deterministic, aligned."""

import hashlib
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.hashing import hash_tree

# The smoke pair every machine must build (issue 26.1): the weights of seed 0, format 3. A change here is a
# change of every smoke run and test's starting point: bump kd.tiny.TINY_FORMAT and say why.
PINNED_SHA256 = {
    "teacher": "7da8ea97b1af457e6045609bbb6401b6569f30343531382ee5e1e72e3d4cbc81",
    "student": "b81db02deb778933606ff88b36fd6aada6e934c7ad41f86d04ae7f17c8b2bbf3",
}
EXPECTED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}


def test_layout_and_loading(tiny_pair):
    teacher, student = tiny_pair
    for d in (teacher, student):
        assert EXPECTED <= {p.name for p in d.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok("the capital of france is", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 3


def test_teacher_vocab_extends_student(tiny_pair):
    teacher, student = tiny_pair
    tt = json.loads((teacher / "tokenizer.json").read_text())
    st = json.loads((student / "tokenizer.json").read_text())
    assert st["model"]["vocab"] == tt["model"]["vocab"]
    extra = [t["content"] for t in tt["added_tokens"]][len(st["added_tokens"]):]
    assert len(extra) == 16
    t_rows = json.loads((teacher / "config.json").read_text())["vocab_size"]
    s_rows = json.loads((student / "config.json").read_text())["vocab_size"]
    assert t_rows >= s_rows + 16


def test_teacher_was_trained(tiny_pair):
    """The teacher predicts the corpus far better than chance; the random student does not."""
    teacher, student = tiny_pair
    tok = AutoTokenizer.from_pretrained(student)
    ids = tok("the capital of france is paris. the colour of the sky is blue.", return_tensors="pt").input_ids
    with torch.no_grad():
        t_loss = AutoModelForCausalLM.from_pretrained(teacher)(ids, labels=ids).loss
        s_loss = AutoModelForCausalLM.from_pretrained(student)(ids, labels=ids).loss
    assert t_loss < 2.0 < s_loss


def _weights_sha256(pair_dir):
    return {role: hashlib.sha256((pair_dir / role / "model.safetensors").read_bytes()).hexdigest()
            for role in ("teacher", "student")}


def test_pair_has_the_pinned_sha256_everywhere(tiny_pair):
    """The pair the tests and `make smoke` use is the pinned one, whatever this CPU's vector units."""
    assert _weights_sha256(tiny_pair[0].parent) == PINNED_SHA256


def test_same_seed_same_bytes_through_the_console_command(tmp_path, tiny_pair):
    """`kdflow make-tiny` (a fresh process) rebuilds the shared pair byte for byte, also when the machine
    pushes MKL onto another code path (MKL_ENABLE_INSTRUCTIONS=AVX2 gave another teacher before issue 26)."""
    env = os.environ | {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "make-tiny", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "student" / "tokenizer.json").is_file()
    assert hash_tree(tmp_path / "m" / "teacher") == hash_tree(tiny_pair[0])
    assert hash_tree(tmp_path / "m" / "student") == hash_tree(tiny_pair[1])
    assert _weights_sha256(tmp_path / "m") == PINNED_SHA256


def test_the_generator_refuses_to_run_unpinned(tmp_path):
    """`python -m kd.tiny` alone would pick this CPU's code paths: it refuses, naming what is not set."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    proc = subprocess.run([sys.executable, "-m", "kd.tiny", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode != 0 and "MKL_CBWR" in proc.stderr and not (tmp_path / "x").exists()
