"""The tiny teacher/student pair: hub-like layout, loads with transformers, deterministic, aligned."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.hashing import hash_tree

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


def test_same_seed_same_bytes_through_the_console_command(tmp_path, tiny_pair):
    """`kdflow make-tiny` (a fresh process) rebuilds the shared pair byte for byte: same seed, same files."""
    proc = subprocess.run([sys.executable, "-m", "kd.cli", "make-tiny", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "student" / "tokenizer.json").is_file()
    assert hash_tree(tmp_path / "m" / "teacher") == hash_tree(tiny_pair[0])
    assert hash_tree(tmp_path / "m" / "student") == hash_tree(tiny_pair[1])
