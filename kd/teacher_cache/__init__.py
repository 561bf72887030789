"""The offline teacher: a content-addressed, verified cache of the teacher's top-k log-probs.

    spec = TopKSpec(k=64, vocab=alignment.valid_vocab)                       # encoding.py
    identity = make_identity(teacher=..., tokenizer=..., data=..., spec=spec, rows_kept=..., cache_temperature=4.0)
    summary = build_teacher_cache(cache_folder(root, identity), identity, spec, load_teacher, splits, ...)
    reader = TeacherCacheReader(summary["folder"], identity); reader.bind("train", packed.train)

encoding.py (bytes per token), store.py (folder, manifest, verification, reading), build.py (running the
teacher, resumable per shard). The loss that reads it is kd.train.losses.fused_linear_sparse_kd_loss.
"""

from kd.teacher_cache.build import build_teacher_cache, teacher_targets
from kd.teacher_cache.encoding import TopKSpec, decode, encode
from kd.teacher_cache.store import (TeacherCacheReader, cache_folder, cache_key, make_identity, manifest_sha256,
                                    read_manifest, stat_fingerprint)

__all__ = ["TopKSpec", "encode", "decode", "build_teacher_cache", "teacher_targets", "TeacherCacheReader",
           "cache_folder", "cache_key", "make_identity", "manifest_sha256", "read_manifest", "stat_fingerprint"]
