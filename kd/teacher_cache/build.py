"""Build a teacher cache: run the teacher once over the prepared blocks, store sparse targets per shard.

    result = build_teacher_cache(folder, identity, spec, load_teacher, {"train": tr, "heldout": ho},
                                 temperature=4.0, rows_kept=..., valid_vocab=..., run_name="run-1")

Resumable per shard: each shard is written to a temp file, renamed, hashed and entered in the manifest
before the next one starts, so after a crash the next call verifies what is there and resumes at the
first missing shard. A complete cache is verified (sha256 of every shard) and reused without loading
the teacher; a missing, truncated or altered shard is rebuilt. `load_teacher` is called only when some
shard must be (re)built.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from kd import __version__
from kd.errors import DataError
from kd.hashing import sha256_file
from kd.train.losses import SPARSE_EXACTNESS, iter_logit_chunks, sparse_teacher_targets
from kd.teacher_cache.encoding import TopKSpec, encode
from kd.teacher_cache.store import (bad_shards, check_identity, manifest_sha256, read_blocks, read_manifest,
                                    tokens_sha256, write_manifest)

SHARD_BYTES = 64 << 20  # ~64 MiB shards: a lost shard costs little teacher time, few files on disk


def _plan_splits(splits: dict[str, torch.Tensor], spec: TopKSpec, blocks_per_shard: int | None) -> dict:
    out = {}
    for name, blocks in splits.items():
        n, t = tuple(blocks.shape)
        per = blocks_per_shard or max(1, SHARD_BYTES // max(1, spec.bytes_per_token() * (t - 1)))
        shards = [{"file": f"{name}-{i:05d}.safetensors", "first_block": s, "blocks": min(per, n - s)}
                  for i, s in enumerate(range(0, n, per))]
        out[name] = {"blocks": n, "seq_len": t, "tokens": n * (t - 1), "blocks_per_shard": per,
                     "tokens_sha256": tokens_sha256(blocks), "shards": shards}
    return out


@torch.no_grad()
def teacher_targets(teacher, backend, ids: torch.Tensor, spec: TopKSpec, *, temperature: float, rows_kept: int,
                    chunk_size: int, position_ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher forward over blocks ids (B, T) -> sparse targets for the B*(T-1) next-token positions.
    Same call as online training's teacher forward (position ids restart per packed document)."""
    dev = next(teacher.parameters()).device
    h = backend.hidden_states(teacher, ids.to(dev), position_ids=None if position_ids is None
                              else position_ids.to(dev))[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    w, b = backend.output_head(teacher)
    parts = [sparse_teacher_targets(logits, spec.k, temperature, spec.vocab)
             for _, logits in iter_logit_chunks(h, w[:rows_kept], None if b is None else b[:rows_kept],
                                                chunk_size=chunk_size, valid_vocab=spec.vocab)]
    return tuple(torch.cat(x) for x in zip(*parts))


def build_teacher_cache(
    folder: str | Path,
    identity: dict,
    spec: TopKSpec,
    load_teacher: Callable[[], tuple[object, object]],
    splits: dict,
    *,
    temperature: float,
    rows_kept: int,
    run_name: str,
    teacher_repo: str = "",
    batch_size: int = 8,
    chunk_size: int = 256,
    blocks_per_shard: int | None = None,
    on_shard: Callable[[dict], None] | None = None,
    source: dict | None = None,
) -> dict:
    """Make `folder` a complete cache of `splits` ({name: kd.data.Split or (blocks, T) int64 tensor}); returns:
    status (built | resumed | repaired | reused), shards_built, teacher_forwards, tokens, bytes, build rates.

    `load_teacher()` -> (model, backend with hidden_states/output_head). `on_shard(info)` runs after each
    shard is on disk (progress; tests use it to simulate a crash). A teacher computed elsewhere: load_teacher()
    -> (targets, None), targets(ids, position_ids) -> what teacher_targets gives (kd/teacher_cache/from_server.py);
    `source` (what computed them) goes into the manifest once it is loaded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = _plan_splits(splits, spec, blocks_per_shard)
    try:
        m = read_manifest(folder)
    except DataError:  # an unreadable manifest vouches for nothing: build again from scratch
        m = None
    if m is not None:
        check_identity(folder, m, identity)
        for name, info in plan.items():
            have = m["splits"].get(name, {})
            if have.get("tokens_sha256") != info["tokens_sha256"]:
                raise DataError(f"teacher cache {folder}: the {name} tokens differ from the ones it was built on")
        done = {s["file"]: s for split in m["splits"].values() for s in split["shards"] if "sha256" in s}
        was_complete = m.get("status") == "complete"
    else:
        done, was_complete = {}, False
        m = {"format": identity["format"], "identity": identity, "kdflow_version": __version__,
             "teacher": {"repo": teacher_repo, "content_hash": identity["teacher"]},
             "tokenizer_hash": identity["tokenizer"], "data_fingerprint": identity["data"],
             "top_k": spec.k, "encoding": spec.describe(),
             "temperature": {"cache_temperature": identity["cache_temperature"],
                             "semantics": SPARSE_EXACTNESS["temperature"]},
             "exactness": SPARSE_EXACTNESS,
             "built_by": {"run": run_name, "started": datetime.now(timezone.utc).isoformat()}}
    # which recorded shards are still good (a crash, a truncated or edited file: rebuilt)
    m["splits"] = plan
    bad = set(bad_shards(folder, {"splits": {"x": {"shards": list(done.values())}}})) if done else set()
    for info in plan.values():
        for s in info["shards"]:
            if s["file"] in done and s["file"] not in bad:
                s.update(bytes=done[s["file"]]["bytes"], sha256=done[s["file"]]["sha256"])
    todo = [(name, s) for name, info in plan.items() for s in info["shards"] if "sha256" not in s]
    m["status"] = "building" if todo else "complete"
    write_manifest(folder, m)

    teacher = backend = None
    forwards = tokens_built = 0
    t0 = time.perf_counter()
    for name, shard in todo:
        if teacher is None:
            teacher, backend = load_teacher()
            if source is not None:
                m["source"] = source
        first, count = shard["first_block"], shard["blocks"]
        parts = []
        for s in range(first, first + count, batch_size):
            ids, pos = read_blocks(splits[name], s, min(s + batch_size, first + count))
            if backend is None:  # a served teacher: `teacher` is its targets function
                tid, lp, tail = teacher(ids, pos)
            else:
                tid, lp, tail = teacher_targets(teacher, backend, ids, spec, temperature=temperature,
                                                rows_kept=rows_kept, chunk_size=chunk_size, position_ids=pos)
            forwards += 1
            parts.append(encode(tid, lp, tail, spec))
        arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        path = folder / shard["file"]
        tmp = folder / f".{shard['file']}.{os.getpid()}.tmp"
        save_file(arrays, str(tmp), metadata={"kdflow_teacher_cache": f"{name}:{first}"})  # one key: map order is unstable
        os.replace(tmp, path)
        shard.update(bytes=path.stat().st_size, sha256=sha256_file(path))
        tokens_built += count * (plan[name]["seq_len"] - 1)
        write_manifest(folder, m)  # this shard now counts as done: a crash from here resumes after it
        if on_shard is not None:
            on_shard({"split": name, **shard})
    wall = time.perf_counter() - t0
    if todo:
        m["status"] = "complete"
        m["build"] = {"finished": datetime.now(timezone.utc).isoformat(), "by_run": run_name,
                      "last_wall_s": wall, "last_tokens": tokens_built,
                      "last_tokens_per_s": tokens_built / max(wall, 1e-9), "last_teacher_forwards": forwards}
        write_manifest(folder, m)
    total_tokens = sum(i["tokens"] for i in plan.values())
    total_bytes = sum(s["bytes"] for i in plan.values() for s in i["shards"])
    if not todo:
        status = "reused"
    elif len(todo) == sum(len(i["shards"]) for i in plan.values()):
        status = "built"
    else:
        status = "repaired" if was_complete else "resumed"
    return {"status": status, "folder": str(folder), "manifest_sha256": manifest_sha256(folder),
            "built_by_run": m["built_by"]["run"], "shards": sum(len(i["shards"]) for i in plan.values()),
            "shards_built": len(todo), "teacher_forwards": forwards, "tokens": total_tokens,
            "tokens_built": tokens_built, "bytes": total_bytes, "bytes_per_token": total_bytes / max(total_tokens, 1),
            "build_wall_s": wall, "build_tokens_per_s": tokens_built / wall if tokens_built else None,
            "top_k": spec.k, "encoding": spec.encoding}
