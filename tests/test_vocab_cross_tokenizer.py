"""check_vocab across tokenizer families (issue 30 item 1): the `cross-tokenizer` verdict behind
kd.cross_tokenizer.enabled, the refusal naming that setting, and the alignment statistics on sample text."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kd.config import RunConfig
from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.report import alignment_report
from kd.cross_tokenizer.vocab_files import load_tokenizer
from kd.errors import ConfigError, VocabError
from kd.vocab import align_vocab

TEXT = ("The cat sat on the mat. 12345 apples cost $3.50 each! 😀 emoji, 日本語のテキスト, and   spaces.\n"
        "def f(x):\n    return x ** 2  # digits 2026-12-05\n")


@pytest.fixture(scope="session")
def gpt2_student(tmp_path_factory, tiny_pair):
    """The tiny student's config with GPT-2's tokenizer (no weights: the vocab check reads files only)."""
    out = tmp_path_factory.mktemp("gpt2-student")
    shutil.copytree(tiny_pair[1], out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    tok = load_tokenizer("gpt2")
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_config_default_off_and_needs_online_teacher():
    base = {"teacher": {"repo": "tiny:teacher"}, "student": {"repo": "tiny:student"}}
    assert RunConfig.model_validate(base).kd.cross_tokenizer.enabled is False
    on = RunConfig.model_validate({**base, "kd": {"cross_tokenizer": {"enabled": True, "kind": "uld"}}})
    assert on.kd.cross_tokenizer.kind == "uld"
    from kd.config import format_validation_error
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate({**base, "kd": {"teacher_mode": "offline", "cross_tokenizer": {"enabled": True}}})
    assert "kd.cross_tokenizer.enabled" in format_validation_error(err.value)
    with pytest.raises(ValidationError):
        RunConfig.model_validate({**base, "kd": {"cross_tokenizer": {"enabled": True, "kind": "nope"}}})
    with pytest.raises(ConfigError, match="kd.cross_tokenizer"):
        from kd.config import load_config
        load_config("configs/smoke.yaml", ["kd.cross_tokenizer.bogus=1"])


def test_different_tokenizer_refused_naming_the_setting(tiny_pair, gpt2_student):
    with pytest.raises(VocabError, match=r"kd\.cross_tokenizer\.enabled"):
        align_vocab(tiny_pair[0], gpt2_student)


def test_cross_tokenizer_verdict_when_enabled(tiny_pair, gpt2_student):
    va = align_vocab(tiny_pair[0], gpt2_student, cross_tokenizer=True)
    assert va.verdict == "cross-tokenizer"
    # the same tokenizer stays a same-vocabulary verdict even with the setting on
    same = align_vocab(tiny_pair[0], tiny_pair[1], cross_tokenizer=True)
    assert same.verdict == "teacher-padded"
    n_teacher = same.teacher_tokenizer_size
    assert (va.teacher_tokenizer_size, va.student_tokenizer_size) == (n_teacher, 50257)
    assert (va.rows_kept, va.valid_vocab, va.padding_ids) == (n_teacher, 50257, [])


def _blocks(tok, n: int = 2, length: int = 64) -> torch.Tensor:
    ids = tok((TEXT * 4), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * length]).view(n, length)


def test_report_identity_pair_is_all_one_to_one(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    pair = TokenizerPair.of(tok, tok)
    stats = alignment_report(pair, _blocks(tok))
    assert stats["one_to_one_share"] == 1.0
    assert stats["mean_teacher_group"] == stats["mean_student_group"] == 1.0
    assert stats["exact_match"]["teacher_share"] == 1.0
    assert stats["teacher_not_round_trip"] == stats["student_not_round_trip"] == 0


def test_report_real_cross_pair_with_teacher_mass(tiny_pair):
    from transformers import AutoTokenizer

    from backends import get_backend

    t_tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    pair = TokenizerPair.of(t_tok, load_tokenizer("gpt2"))
    teacher = get_backend("hf").load(tiny_pair[0])
    stats = alignment_report(pair, _blocks(pair.student), teacher_model=teacher)
    assert stats["documents"] >= 2 and stats["groups"] > 0
    assert 0.0 < stats["one_to_one_share"] < 1.0
    assert stats["mean_teacher_group"] > stats["mean_student_group"] >= 1.0  # the 360-token teacher splits more
    assert 0.0 < stats["exact_match"]["teacher_share"] <= 1.0
    assert 0.0 <= stats["teacher_matched_mass_mean"] <= 1.0
    assert stats["teacher_tokens_scored"] > 0
    # block edges cut through characters are dropped, so the student side always round-trips
    assert stats["student_not_round_trip"] == 0
    json.dumps(stats)


def test_known_tokenizer_sizes_size_a_transplanted_student_at_preflight():
    from kd.config import load_config
    from kd.cross_tokenizer.vocab_files import VOCAB_SIZES
    from kd.preflight import run_preflight

    assert {k: len(load_tokenizer(k)) for k in VOCAB_SIZES} == VOCAB_SIZES
    cfg = load_config("configs/smollm2-135m-cross-tokenizer.yaml")
    report = run_preflight(cfg)
    assert report.plan["student"]["vocab_size"] == VOCAB_SIZES["gpt2"]
