"""Task `cache_teacher_logits` (kd.teacher_mode=offline): the teacher runs once over the prepared data.

Cached on what the cache is a function of (teacher content, tokenizer and prepared-data hashes, k, encoding,
temperature; not alpha, lr, steps or seed) plus where the store is; a hit whose folder has since been
deleted, left incomplete or changed (size/mtime of a shard) is a miss, and the step then verifies
sha256, rebuilds what is bad and resumes what is missing. The flows call it through
flows.teacher_cache.cache_step: in-process, or as the `kd-teacher-cache` deployment
(`orchestration.cache_deployment`, e.g. on a big-GPU pool).
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from kd.config import RunConfig
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, VocabAlignment
from kd.teacher_cache.step import cache_problems, cache_root, identity_for
from kd.teacher_cache.step import cache_teacher_logits as build_cache
from kd.teacher_cache.store import cache_key
from kd.train.loop import resolve_device
from tasks.policy import content_key, fresh_key, provenance, retry_transient

STEP = "cache_teacher_logits"


def _cache_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    ident = identity_for(cfg, parameters["teacher"], parameters["alignment"], parameters["prepared"])
    key = content_key("teacher-cache", cache_key(ident), str(cache_root(cfg)))
    return fresh_key(context, key, cache_problems, STEP)


def cache_artifact(r: TeacherCacheResult, *, prefect_cached: bool = False) -> None:
    how = "reused (Prefect cache hit: no teacher forward)" if prefect_cached else r.status
    rows = [("status", how), ("built by run", r.built_by_run), ("folder", r.folder),
            ("manifest sha256", r.manifest_sha256), ("tokens", f"{r.tokens:,}"), ("shards", r.shards),
            ("shards built now", r.shards_built), ("teacher forwards now", r.teacher_forwards),
            ("top-k", r.top_k), ("encoding", f"{r.encoding['encoding']} ({r.encoding['bytes_per_token']} B/token)"),
            ("bytes/token on disk", f"{r.bytes_per_token:.1f}"), ("bytes", f"{r.bytes:,}"),
            ("build tokens/s", "–" if r.build_tokens_per_s is None else f"{r.build_tokens_per_s:,.0f}"),
            ("cache temperature", r.cache_temperature)]
    create_table_artifact(key="teacher-cache", table=[{"field": k, "value": str(v)} for k, v in rows],
                          description=f"Teacher top-k cache: {how}")


@task(name=STEP, cache_key_fn=_cache_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def cache_teacher_logits_task(config: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment,
                              prepared: PreparedData, run_name: str) -> TeacherCacheResult:
    progress = create_progress_artifact(progress=0.0, key="teacher-cache-progress",
                                        description="Teacher cache: shards on disk")
    total = max(1, sum(prepared.counts.get(f"{s}_blocks", 0) for s in ("train", "heldout")))
    seen = [0]

    def on_shard(info: dict) -> None:
        seen[0] += info["blocks"]
        update_progress_artifact(progress, progress=min(100.0, 100.0 * seen[0] / total))

    result = build_cache(config, teacher, alignment, prepared, run_name, device=resolve_device(config)[0],
                         produced_by=provenance(run_name), on_shard=on_shard)
    update_progress_artifact(progress, progress=100.0)
    cache_artifact(result)
    return result

