"""Issue 30: the real tokenizers are hash-locked (requirements-tokenizers.lock), fetched once, and a forged
archive or a missing file is refused by name."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from kd.cross_tokenizer import vocab_files
from kd.cross_tokenizer.vocab_files import (
    LOCK, MARKER, TEACHER, VOCABS, ensure_vocab_ggufs, load_tokenizer, parse_lock, tokenizer_folder,
)
from kd.errors import ModelError
from kd.hashing import sha256_file


def test_lock_pins_the_archive_and_every_file_used():
    req, digest, members = parse_lock(LOCK.read_text())
    assert req == "llama-cpp-python==0.3.36" and len(digest) == 64
    assert sorted(m.rsplit("/", 1)[-1] for m in members) == sorted(VOCABS.values())


def test_extracted_files_match_the_lock_and_a_second_call_downloads_nothing(monkeypatch):
    folder = ensure_vocab_ggufs()
    _, digest, members = parse_lock(LOCK.read_text())
    info = json.loads((folder / MARKER).read_text())
    assert info["archive_sha256"] == digest
    for member, sha in members.items():
        name = member.rsplit("/", 1)[-1]
        assert sha256_file(folder / name) == sha == info["files"][name]
    assert sorted(p.name for p in folder.glob("*.gguf")) == sorted(VOCABS.values())  # nothing else kept

    def no_network(dest):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(vocab_files, "_download", no_network)
    assert ensure_vocab_ggufs() == folder


def _archive(tmp_path, content: bytes):
    path = tmp_path / "forged.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = io.BytesIO(content)
        info = tarfile.TarInfo("pkg-1.0/vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf")
        info.size = len(content)
        tar.addfile(info, data)
    return path


def test_forged_or_incomplete_archive_is_refused(tmp_path):
    member = "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf"
    with pytest.raises(ModelError, match="sha256"):
        vocab_files._extract(_archive(tmp_path, b"GGUF not the real one"), {member: "0" * 64}, tmp_path)
    with pytest.raises(ModelError, match="holds no"):
        vocab_files._extract(_archive(tmp_path, b"x"), {"vendor/llama.cpp/models/ggml-vocab-qwen2.gguf": "0" * 64},
                             tmp_path)


@pytest.mark.parametrize("name,size", [("qwen2", 151_936), ("llama3", 128_257), ("gpt2", 50_257), ("phi3", 32_064),
                                       (TEACHER, 49_152)])
def test_tokenizers_load_fast_with_offsets(name, size):
    tok = load_tokenizer(name)
    assert tok.is_fast and len(tok) == size
    enc = tok("Hi 😀", add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"]) > 0
    assert (tokenizer_folder(name) / MARKER).is_file()


def test_unknown_tokenizer_is_named():
    with pytest.raises(ModelError, match="unknown tokenizer 'gemma4'"):
        tokenizer_folder("gemma4")
