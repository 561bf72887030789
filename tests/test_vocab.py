"""kd.vocab on the tiny pair and on edited copies of it (swapped tokens, other eos, bigger student)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kd.config import KDConfig
from kd.errors import VocabError
from kd.vocab import align_vocab, measure_dropped_mass


@pytest.fixture(scope="session")
def tiny_info(tiny_pair) -> dict:
    return json.loads((tiny_pair[0].parent / "tiny.json").read_text())


@pytest.fixture(scope="session")
def edited(tmp_path_factory, tiny_pair):
    """Make a copy of a tiny model folder and edit its JSON files: edited(which, name, {file: fn(dict)})."""
    root = tmp_path_factory.mktemp("vocab")

    def make(which: int, name: str, edits: dict) -> Path:
        out = root / name
        shutil.copytree(tiny_pair[which], out, ignore=shutil.ignore_patterns("*.safetensors"))
        for file, fn in edits.items():
            data = json.loads((out / file).read_text())
            fn(data)
            (out / file).write_text(json.dumps(data))
        return out

    return make


@pytest.fixture(scope="session")
def sample_ids(tiny_pair) -> torch.Tensor:
    """(4, 64) token ids of the smoke corpus, as the student tokenizer splits it."""
    from tokenizers import Tokenizer

    from kd.tiny import CORPUS

    tok = Tokenizer.from_file(str(tiny_pair[1] / "tokenizer.json"))
    ids = [i for line in CORPUS.read_text().splitlines() for i in tok.encode(line).ids]
    return torch.tensor(ids[: 4 * 64]).view(4, 64)


@pytest.fixture(scope="session")
def teacher(tiny_pair):
    from backends import get_backend

    return get_backend("hf").load(tiny_pair[0])


def test_identical(tiny_pair, tiny_info):
    va = align_vocab(tiny_pair[1], tiny_pair[1])
    assert va.verdict == "identical"
    assert va.teacher_rows == va.student_rows == va.rows_kept == tiny_info["student_rows"]
    assert va.valid_vocab == va.student_tokenizer_size == tiny_info["student_tokens"]
    assert va.special_tokens["eos"] is not None


def test_teacher_padded_rows_cut_and_mass_small(tiny_pair, tiny_info, teacher, sample_ids):
    va = align_vocab(*tiny_pair)
    assert va.verdict == "teacher-padded"
    assert (va.teacher_rows, va.student_rows) == (tiny_info["teacher_rows"], tiny_info["student_rows"])
    assert va.teacher_tokenizer_size == va.student_tokenizer_size + 16 == tiny_info["teacher_tokens"]
    assert va.rows_kept == va.student_rows
    assert va.valid_vocab == va.student_tokenizer_size
    assert va.padding_ids == [va.valid_vocab, va.teacher_rows - 1]
    mean, mx = measure_dropped_mass(teacher, sample_ids, va.valid_vocab)
    assert 0 < mean <= mx < 1
    assert mean < KDConfig().max_dropped_mass  # the trained teacher puts ~no mass on its extra ids


def test_same_tokenizer_more_rows_is_teacher_padded(tiny_pair, edited):
    """The Qwen2.5-7B shape: same tokenizer, only more (padding) rows."""
    wide = edited(1, "wide-rows", {"config.json": lambda c: c.update(vocab_size=c["vocab_size"] + 128)})
    va = align_vocab(wide, tiny_pair[1])
    assert va.verdict == "teacher-padded"
    assert va.teacher_tokenizer_size == va.student_tokenizer_size
    assert va.rows_kept == va.student_rows and va.padding_ids == [va.valid_vocab, va.teacher_rows - 1]


def test_dropped_mass_matches_full_softmax(teacher, sample_ids):
    with torch.no_grad():
        probs = teacher(input_ids=sample_ids).logits.float().softmax(-1).reshape(-1, teacher.config.vocab_size)
    for first in (100, 300):
        dropped = probs[:, first:].sum(-1)
        mean, mx = measure_dropped_mass(teacher, sample_ids, first, chunk_size=7)
        assert mean == pytest.approx(float(dropped.mean()), rel=1e-4, abs=1e-9)
        assert mx == pytest.approx(float(dropped.max()), rel=1e-4, abs=1e-9)
    assert measure_dropped_mass(teacher, sample_ids, teacher.config.vocab_size) == (0.0, 0.0)


def test_untrained_model_puts_real_mass_on_padding(tiny_pair, tiny_info, sample_ids):
    """Falsifier for the threshold: a random-init output layer spreads mass over every row."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_pair[1])).eval()
    mean, _ = measure_dropped_mass(untrained, sample_ids, tiny_info["student_tokens"])
    share = 1 - tiny_info["student_tokens"] / tiny_info["student_rows"]  # ~uniform over the rows
    assert mean == pytest.approx(share, rel=0.5)
    assert mean > 10 * KDConfig().max_dropped_mass


def test_student_larger_is_refused(tiny_pair):
    with pytest.raises(VocabError, match="student-larger"):
        align_vocab(tiny_pair[1], tiny_pair[0])


def test_swapped_token_in_shared_range_is_refused(tiny_pair, tiny_info, edited):
    vocab = json.loads((tiny_pair[0] / "tokenizer.json").read_text())["model"]["vocab"]
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (200, 201))

    def swap(tok):
        tok["model"]["vocab"][a], tok["model"]["vocab"][b] = 201, 200

    swapped = edited(0, "swapped", {"tokenizer.json": swap})
    with pytest.raises(VocabError) as err:
        align_vocab(swapped, tiny_pair[1])
    msg = str(err.value)
    assert f"differ on 2 of {tiny_info['student_tokens']} shared ids" in msg
    assert f"id 200: teacher {b!r} vs student {a!r}" in msg


def test_different_eos_is_refused(tiny_pair, edited):
    vocab = json.loads((tiny_pair[1] / "tokenizer.json").read_text())["model"]["vocab"]
    other = next(t for t, i in vocab.items() if i == 1)
    eos_is_1 = {
        "tokenizer_config.json": lambda c: c.update(eos_token=other),
        "generation_config.json": lambda c: c.update(eos_token_id=1),
        "config.json": lambda c: c.update(eos_token_id=1),
    }
    with pytest.raises(VocabError, match=r"special token eos differs: teacher id 1 \(.*\) vs student id 0"):
        align_vocab(edited(1, "eos1", eos_is_1), tiny_pair[1])


def test_tokenizer_larger_than_its_matrix_is_refused(tiny_pair, tiny_info, edited):
    short = edited(1, "short-rows", {"config.json": lambda c: c.update(vocab_size=100)})
    n = tiny_info["student_tokens"]
    with pytest.raises(VocabError, match=f"student tokenizer has {n} tokens but its output matrix only 100 rows"):
        align_vocab(tiny_pair[1], short)
