"""kd/teacher_cache on the tiny models and a real prepared set: build, read back, integrity, lineage, resume.

Effects, not declarations: a flipped byte or a truncated shard is caught by sha256 and rebuilt; a cache
from another teacher, tokenizer or data is refused; a crash mid-build resumes at the first missing
shard and ends byte-identical to an uninterrupted build; at k = vocab the offline loss from the cache
equals the online loss with the real teacher.
"""

from __future__ import annotations

import json

import pytest
import torch

from backends import get_backend
from kd.errors import DataError
from kd.train.losses import fused_linear_kd_loss, fused_linear_sparse_kd_loss
from kd.teacher_cache import (TeacherCacheReader, TopKSpec, build_teacher_cache, cache_folder, make_identity,
                              read_manifest, stat_fingerprint)

TEMP = 2.0


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    from kd.config import load_config
    from kd.data import open_prepared, prepare_data
    from kd.vocab import align_vocab

    teacher_dir, student_dir = tiny_pair
    cfg = load_config("configs/smoke.yaml", [f"data.prepared_dir={tmp_path_factory.mktemp('prepared')}",
                                             "data.max_tokens=2500"])
    prepared = prepare_data(cfg.data, student_dir)
    ps = open_prepared(prepared.path)
    alignment = align_vocab(teacher_dir, student_dir)
    be = get_backend("hf")
    teacher = be.load(teacher_dir).eval()
    return {"ps": ps, "prepared": prepared, "alignment": alignment, "teacher": teacher, "backend": be,
            "student_dir": student_dir, "root": tmp_path_factory.mktemp("cache")}


def build(setup, folder=None, *, k=16, encoding="packed", run="run-a", identity=None, **kw):
    a = setup["alignment"]
    spec = TopKSpec(k=k, vocab=a.valid_vocab, encoding=encoding)
    ident = identity or make_identity(teacher="T" * 8, tokenizer=setup["prepared"].tokenizer_sha256,
                                      data=setup["prepared"].content_hash, spec=spec, rows_kept=a.rows_kept,
                                      cache_temperature=TEMP)
    folder = folder or cache_folder(setup["root"], ident)
    loads = []

    def load():
        loads.append(1)
        return setup["teacher"], setup["backend"]

    splits = {"train": setup["ps"].train, "heldout": setup["ps"].heldout}
    out = build_teacher_cache(folder, ident, spec, load, splits, temperature=TEMP, rows_kept=a.rows_kept,
                              run_name=run, batch_size=8, chunk_size=64, blocks_per_shard=kw.pop("bps", 16), **kw)
    out["teacher_loads"] = len(loads)
    return out, ident


def test_build_then_reuse_without_the_teacher(setup):
    first, ident = build(setup)
    assert first["status"] == "built" and first["teacher_forwards"] > 0 and first["shards"] >= 3
    again, _ = build(setup, run="run-b")
    assert again["status"] == "reused" and again["teacher_forwards"] == 0 and again["teacher_loads"] == 0
    assert again["built_by_run"] == "run-a" and again["manifest_sha256"] == first["manifest_sha256"]
    m = read_manifest(first["folder"])
    assert m["identity"] == ident and m["status"] == "complete" and m["top_k"] == 16
    assert m["temperature"]["cache_temperature"] == TEMP and "forward_kl" in m["exactness"]
    assert 0 < first["bytes_per_token"] < 16 * 8  # far below float32 ids + log-probs


def test_offline_loss_at_k_equal_vocab_equals_the_online_loss(setup):
    a, be = setup["alignment"], setup["backend"]
    out, ident = build(setup, k=a.valid_vocab, encoding="float32")
    reader = TeacherCacheReader(out["folder"], ident)
    reader.bind("train", setup["ps"].train)
    batch = setup["ps"].train.batch([5, 2, 9])
    student = be.load(setup["student_dir"])
    h = be.hidden_states(student, batch.ids, position_ids=batch.position_ids)[:, :-1].reshape(-1, 64)
    w, _ = be.output_head(student)
    with torch.no_grad():
        ht = be.hidden_states(setup["teacher"], batch.ids, position_ids=batch.position_ids)[:, :-1]
    tw, _ = be.output_head(setup["teacher"])
    kw = dict(alpha=0.3, temperature=TEMP, valid_vocab=a.valid_vocab, chunk_size=32)
    online = fused_linear_kd_loss(h, w, ht.reshape(-1, ht.shape[-1]), tw[: a.rows_kept], batch.labels.reshape(-1), **kw)
    g_on = torch.autograd.grad(online.loss, w, retain_graph=True)[0]
    offline = fused_linear_sparse_kd_loss(h, w, *reader.targets(batch.ids, batch.position_ids),
                                          batch.labels.reshape(-1), cache_temperature=TEMP, **kw)
    g_off = torch.autograd.grad(offline.loss, w)[0]
    assert float(offline.loss.detach()) == pytest.approx(float(online.loss), rel=1e-5)
    assert float((g_off - g_on).norm() / g_on.norm()) < 1e-5


def test_corrupt_and_truncated_shards_are_caught_then_rebuilt(setup):
    out, ident = build(setup)
    folder = out["folder"]
    m = read_manifest(folder)
    victim, other = m["splits"]["train"]["shards"][1]["file"], m["splits"]["heldout"]["shards"][0]["file"]
    before = stat_fingerprint(folder)
    data = bytearray((setup["root"] / folder / victim).read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the payload, same size
    (setup["root"] / folder / victim).write_bytes(bytes(data))
    with open(setup["root"] / folder / other, "r+b") as f:
        f.truncate(100)
    assert stat_fingerprint(folder) != before  # the Prefect cache key sees it: the step runs again
    with pytest.raises(DataError, match="teacher cache shard .*: missing, truncated or altered") as err:
        TeacherCacheReader(folder, ident)
    assert victim in str(err.value) and other in str(err.value)
    fixed, _ = build(setup, run="run-c")
    assert fixed["status"] == "repaired" and fixed["shards_built"] == 2 and fixed["built_by_run"] == "run-a"
    TeacherCacheReader(folder, ident)  # verifies every sha256 again


def test_foreign_cache_is_never_used(setup):
    out, ident = build(setup)
    for field, value in (("teacher", "another-teacher"), ("tokenizer", "another-tokenizer"), ("data", "other-data"),
                         ("k", 8), ("cache_temperature", 1.0)):
        with pytest.raises(DataError, match=f"built for another {field}"):
            TeacherCacheReader(out["folder"], {**ident, field: value})
        with pytest.raises(DataError, match=f"built for another {field}"):  # and never built over either
            build(setup, out["folder"], identity={**ident, field: value})
    reader = TeacherCacheReader(out["folder"], ident)
    with pytest.raises(DataError, match="the train tokens differ"):
        reader.bind("train", setup["ps"].heldout)
    with pytest.raises(DataError, match="not in the cache"):
        reader.bind("heldout", setup["ps"].heldout)
        reader.targets(setup["ps"].train.batch([0]).ids)


def test_crashed_build_resumes_at_the_first_missing_shard(setup, tmp_path):
    full, ident = build(setup, tmp_path / "full", bps=16)
    n = full["shards"]

    def crash(info):
        if info["file"] == "train-00001.safetensors":
            raise KeyboardInterrupt("killed mid-build")

    with pytest.raises(KeyboardInterrupt):
        build(setup, tmp_path / "crashed", bps=16, on_shard=crash)
    assert read_manifest(tmp_path / "crashed")["status"] == "building"
    with pytest.raises(DataError, match="incomplete"):
        TeacherCacheReader(tmp_path / "crashed", ident)
    resumed, _ = build(setup, tmp_path / "crashed", bps=16)
    assert resumed["status"] == "resumed" and resumed["shards_built"] == n - 2
    a, b = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "crashed")
    for name in a["splits"]:
        for x, y in zip(a["splits"][name]["shards"], b["splits"][name]["shards"]):
            assert x == y, (x, y)  # the same bytes, shard by shard




@pytest.mark.parametrize("vocab, k", [(49152, 128), (49152, 64), (151936, 128), (360, 360), (360, 7)])
def test_packed_encoding_round_trip_and_size(vocab, k):
    """Same id set, log-probs within half a quantisation step, tail kept, and bytes/token as the formula says."""
    import numpy as np

    from kd.train.losses import sparse_teacher_targets
    from kd.teacher_cache import decode, encode

    g = torch.Generator().manual_seed(vocab + k)
    ids, lp, tail = sparse_teacher_targets(torch.randn(40, vocab, generator=g) * 3, k, 1.0)
    spec = TopKSpec(k, vocab, "packed", 6)
    arrays = encode(ids, lp, tail, spec)
    assert sum(a.nbytes for a in arrays.values()) == 40 * spec.bytes_per_token()
    i2, lp2, tail2 = decode(arrays, spec)
    order1, order2 = ids.sort(1), i2.sort(1)
    assert torch.equal(order1.values, order2.values)
    a, b = lp.gather(1, order1.indices), lp2.gather(1, order2.indices)
    step = torch.from_numpy(arrays["lp_step"].astype(np.float32))[:, None]
    assert bool(((a - b).abs() <= step + 2e-3).all())  # half a step each side, plus the float16 tail
    if k < vocab:
        assert torch.allclose(tail, tail2, atol=2e-3)
    assert spec.bytes_per_token() < (300 if k == 128 and vocab <= 151936 else 10**6)
