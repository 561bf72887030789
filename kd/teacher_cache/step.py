"""The `cache_teacher_logits` DAG step and the offline side of training, on kdflow's own types.

    result = cache_teacher_logits(cfg, teacher_snapshot, alignment, prepared, run_name, device="cpu")
    reader = open_for_training(cfg, result, prepared_set)     # kd/train/objectives.py, offline mode: verified, bound

The cache is a function of the teacher's content, the tokenizer and prepared data (their hashes), k, the
encoding and the temperature (`kd.temperature` is the cache temperature): never of alpha, lr, steps or
seed, so a sweep over those reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path

from kd.config import RunConfig
from kd.errors import ConfigError, DataError
from kd.train.losses import SPARSE_EXACTNESS
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, VocabAlignment
from kd.teacher_cache.build import build_teacher_cache
from kd.teacher_cache.encoding import TopKSpec
from kd.teacher_cache.store import (TeacherCacheReader, cache_folder, cache_key, make_identity, read_manifest,
                                    stat_fingerprint)

TEACHER_DTYPE = "float32"  # the teacher runs in fp32 for the cache (part of the cache's identity)


def cache_root(cfg: RunConfig) -> Path:
    """`kd.cache_dir`, or $KDFLOW_HOME/teacher-cache: a store shared by every run (and machine) that sees it."""
    if cfg.kd.cache_dir:
        return Path(cfg.kd.cache_dir).expanduser().resolve()
    return Path(os.environ.get("KDFLOW_HOME", "~/.cache/kdflow")).expanduser().resolve() / "teacher-cache"


def spec_for(cfg: RunConfig, alignment: VocabAlignment) -> TopKSpec:
    """k = min(kd.top_k, valid vocab): a k at least the vocab size stores every id (exact loss)."""
    return TopKSpec(k=min(cfg.kd.top_k, alignment.valid_vocab), vocab=alignment.valid_vocab,
                    encoding=cfg.kd.cache_encoding, logprob_bits=cfg.kd.cache_logprob_bits)


def identity_for(cfg: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment, prepared: PreparedData) -> dict:
    return make_identity(teacher=teacher.content_hash, tokenizer=prepared.tokenizer_sha256, data=prepared.content_hash,
                         spec=spec_for(cfg, alignment), rows_kept=alignment.rows_kept,
                         cache_temperature=cfg.kd.temperature, teacher_dtype=_teacher_dtype(cfg))


def _teacher_dtype(cfg: RunConfig) -> str:
    """In-process fp32, or the engine and its dtype (teacher.server): caches of the two never stand in for each other."""
    if cfg.teacher.server is None:
        return TEACHER_DTYPE
    from kd.teacher_cache.from_server import teacher_dtype

    return teacher_dtype(cfg.teacher.server)


def _summary_to_result(summary: dict, identity: dict, spec: TopKSpec, manifest: dict, produced_by) -> TeacherCacheResult:
    build = manifest.get("build", {})
    return TeacherCacheResult(
        folder=summary["folder"], key=cache_key(identity), manifest_sha256=summary["manifest_sha256"],
        stat=stat_fingerprint(summary["folder"]), status=summary["status"], built_by_run=summary["built_by_run"],
        top_k=spec.k, vocab=spec.vocab, encoding=spec.describe(), cache_temperature=identity["cache_temperature"],
        exactness=SPARSE_EXACTNESS, tokens=summary["tokens"], shards=summary["shards"],
        shards_built=summary["shards_built"], teacher_forwards=summary["teacher_forwards"], bytes=summary["bytes"],
        bytes_per_token=summary["bytes_per_token"], build_tokens_per_s=build.get("last_tokens_per_s"),
        build_wall_s=build.get("last_wall_s"), produced_by=produced_by, source=manifest.get("source"),
    )


def cache_teacher_logits(cfg: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment, prepared: PreparedData,
                         run_name: str, *, device: str, produced_by=None, on_shard=None) -> TeacherCacheResult:
    """Make sure the cache for these inputs exists, is complete and verifies; build, resume or repair it
    (loading the teacher on `device` only then: the training's, kd.train.loop.resolve_device); return where it
    is and how it was obtained."""
    from backends import get_backend
    from kd.data import open_prepared

    spec = spec_for(cfg, alignment)
    identity = identity_for(cfg, teacher, alignment, prepared)
    folder = cache_folder(cache_root(cfg), identity)
    ps = open_prepared(prepared.path)

    def load_teacher():
        backend = get_backend("hf")
        model = backend.load(teacher.local_dir, device=device, trust_remote_code=cfg.teacher.trust_remote_code)
        return model.eval().requires_grad_(False), backend

    splits = {"train": ps.train, "heldout": ps.heldout}
    if cfg.teacher.server is not None:  # served by an inference engine (issue 29): it computes the top-k
        from kd.teacher_cache.from_server import build_from_server

        summary = build_from_server(cfg, teacher, alignment, folder, identity, spec, splits, run_name, on_shard=on_shard)
        return _summary_to_result(summary, identity, spec, read_manifest(folder), produced_by)
    summary = build_teacher_cache(
        folder, identity, spec, load_teacher, splits,
        temperature=cfg.kd.temperature, rows_kept=alignment.rows_kept, run_name=run_name, teacher_repo=teacher.repo,
        batch_size=cfg.train.batch_size, chunk_size=cfg.kd.chunk_size, on_shard=on_shard)
    return _summary_to_result(summary, identity, spec, read_manifest(folder), produced_by)


def cache_problems(result: TeacherCacheResult) -> list[str]:
    """Why a cached step result cannot be handed on: its folder is gone, incomplete or changed since."""
    folder = Path(result.folder)
    try:
        now = stat_fingerprint(folder)
    except DataError as err:  # an unreadable manifest: the step must run (and rebuild) again
        return [str(err)]
    if now in ("missing", "incomplete"):
        return [f"teacher cache {folder} is {now}"]
    if now != result.stat:
        return [f"teacher cache {folder}: shards changed since it was verified"]
    return []


def check_cache_is_for(cfg: RunConfig, cache: TeacherCacheResult, teacher: ModelSnapshot, alignment: VocabAlignment,
                       prepared: PreparedData) -> None:
    """The cache handed to training must be the one for this teacher, tokenizer, data, k and temperature."""
    want = cache_key(identity_for(cfg, teacher, alignment, prepared))
    if cache.key != want:
        raise ConfigError(f"teacher cache {cache.folder} ({cache.key}) was built for other inputs than this run's "
                          f"({want}: teacher, tokenizer, prepared data, kd.top_k, encoding, kd.temperature); not used")


def open_for_training(cfg: RunConfig, cache: TeacherCacheResult, prepared_set, *, splits=("train",)) -> TeacherCacheReader:
    """A verified reader bound to the training data: sha256 of every shard, the identity the manifest
    records, the data's own fingerprint; any mismatch is a DataError naming the shard or the field (exit 2)."""
    manifest = read_manifest(cache.folder) or {}
    identity = manifest.get("identity", {})
    # the temperature must be the cache's unless every id is stored (the loss then rescales exactly)
    if identity and identity.get("cache_temperature") != cfg.kd.temperature and identity.get("k") != identity.get("vocab"):
        raise ConfigError(f"kd.temperature: {cfg.kd.temperature:g} differs from the teacher cache's "
                          f"{identity.get('cache_temperature'):g} (top-k {identity.get('k')} < vocab): rebuild the cache")
    reader = TeacherCacheReader(cache.folder, identity=None)
    if cache_key(reader.manifest["identity"]) != cache.key:
        raise ConfigError(f"teacher cache {cache.folder} holds another cache than this run's ({cache.key})")
    for name in splits:
        reader.bind(name, getattr(prepared_set, name))
    return reader
