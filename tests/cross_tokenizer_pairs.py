"""Shared by the cross-tokenizer test modules: each real tokenizer pair is built once per process (the byte
tables of a 152k vocabulary take a second or two)."""

from __future__ import annotations

import functools

from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.token_bytes import TokenBytes, token_bytes
from kd.cross_tokenizer.vocab_files import TEACHER, VOCABS, load_tokenizer

STUDENTS = sorted(VOCABS)  # gpt2, llama3, phi3, qwen2: with SmolLM2's as the teacher, the four real pairs


@functools.lru_cache(maxsize=None)
def _table(name: str) -> TokenBytes:
    return token_bytes(load_tokenizer(name))


@functools.lru_cache(maxsize=None)
def real_pair(student: str) -> TokenizerPair:
    """SmolLM2's tokenizer (teacher) with `student`'s; real_pair(TEACHER) is SmolLM2 on both sides."""
    return TokenizerPair(load_tokenizer(TEACHER), load_tokenizer(student), _table(TEACHER), _table(student))


def all_pairs() -> dict[str, TokenizerPair]:
    return {name: real_pair(name) for name in [*STUDENTS, TEACHER]}
