"""Data sources, packing, the held-out split and the step -> batch function."""

import json

import numpy as np

import pytest
import torch

from kd.config import DataConfig
from kd.data import pack_dataset, sample_blocks, train_batch
from kd.errors import DataError


def test_smoke_pack_is_deterministic(tiny_pair):
    _, student = tiny_pair
    a = pack_dataset(DataConfig(), student, max_positions=256, min_train_blocks=8)
    b = pack_dataset(DataConfig(), student, max_positions=256, min_train_blocks=8)
    assert a.content_hash == b.content_hash and np.array_equal(a.heldout.tokens, b.heldout.tokens)
    n_docs = len(a.train.docs()) + len(a.heldout.docs())
    assert a.train.shape[1] == 64 and len(a.heldout.docs()) == round(n_docs * 0.1)  # documents held out
    assert not set(a.train.docs()[:, 3]) & set(a.heldout.docs()[:, 3])  # held-out really held out


def test_jsonl_and_txt_folder(tmp_path, tiny_pair):
    _, student = tiny_pair
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"the cat sees the dog {i}."}) for i in range(300)))
    (tmp_path / "b.txt").write_text("\n".join(f"one plus two is three {i}." for i in range(300)))
    packed = pack_dataset(DataConfig(source=str(tmp_path), text_field="body", seq_len=32), student,
                          max_positions=256)
    assert packed.source_files == [str((tmp_path / "a.jsonl").resolve()), str((tmp_path / "b.txt").resolve())]
    assert len(packed.train) > 0 and packed.manifest["counts"]["documents"] == 600


def test_jsonl_missing_field_names_it(tmp_path, tiny_pair):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: text: record has no field 'text'"):
        pack_dataset(DataConfig(source=str(tmp_path / "a.jsonl"), format="text"), tiny_pair[1], max_positions=256)
    with pytest.raises(DataError, match=r"a\.jsonl:1: cannot tell the format .*its fields: \['content'\]"):
        pack_dataset(DataConfig(source=str(tmp_path / "a.jsonl")), tiny_pair[1], max_positions=256)


def test_too_small_says_found_and_needed(tmp_path, tiny_pair):
    (tmp_path / "tiny.txt").write_text("the cat.\n")
    with pytest.raises(DataError, match=r"1 usable document\(s\); need at least 2"):
        pack_dataset(DataConfig(source=str(tmp_path / "tiny.txt")), tiny_pair[1], max_positions=256)
    (tmp_path / "tiny.txt").write_text("the cat.\nthe dog.\nthe bird.\n")
    with pytest.raises(DataError, match=r"found \d+ tokens in 3 documents, .* 1 training blocks .*; need at least 8"):
        pack_dataset(DataConfig(source=str(tmp_path / "tiny.txt")), tiny_pair[1], max_positions=256,
                     min_train_blocks=8)


def test_seq_len_beyond_context_is_an_error(tiny_pair):
    with pytest.raises(DataError, match="max_position_embeddings=256"):
        pack_dataset(DataConfig(seq_len=512), tiny_pair[1], max_positions=256)


def test_missing_source(tiny_pair):
    with pytest.raises(DataError, match="no such file"):
        pack_dataset(DataConfig(source="/no/such/corpus.txt"), tiny_pair[1], max_positions=256)


def test_batches_are_a_function_of_step_and_cover_an_epoch():
    train = torch.arange(10).view(10, 1)
    kw = dict(batch_size=2, grad_accum=1, seed=7)
    first_epoch = torch.cat([train_batch(train, step=s, micro=0, **kw) for s in range(5)]).flatten()
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(train_batch(train, step=3, micro=0, **kw), train_batch(train, step=3, micro=0, **kw))
    other_seed = torch.cat([train_batch(train, step=s, micro=0, batch_size=2, grad_accum=1, seed=8)
                            for s in range(5)]).flatten()
    assert not torch.equal(first_epoch, other_seed)


def test_sample_blocks(tiny_pair):
    blocks = sample_blocks(DataConfig(), tiny_pair[1], n_blocks=4)
    assert blocks.shape == (4, 64)


def test_parquet_source(tmp_path, tiny_pair):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"the capital of peru is lima {i}." for i in range(400)]}),
                   tmp_path / "corpus.parquet")
    packed = pack_dataset(DataConfig(source=str(tmp_path / "corpus.parquet"), seq_len=32), tiny_pair[1],
                          max_positions=256)
    assert packed.train.shape[1] == 32 and packed.tokens_read > 400 * 5
    with pytest.raises(DataError, match="corpus.parquet:1: cannot tell the format"):
        pack_dataset(DataConfig(source=str(tmp_path / "corpus.parquet"), text_field="body"), tiny_pair[1],
                     max_positions=256)
