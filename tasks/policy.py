"""What every kdflow task shares: retry only transient errors, content-derived cache keys."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from kd import __version__
from kd.errors import TransientError

log = logging.getLogger("kdflow.cache")


def retry_transient(task, task_run, state) -> bool:
    """retry_condition_fn: retry TransientError (network, flaky worker) and nothing else."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:  # validation, gates, bugs: retrying cannot help
        return False
    return False


def content_key(step: str, *parts: Any) -> str:
    """A cache key from JSON-able content (hashes, config fields) plus the kdflow version."""
    blob = json.dumps([step, __version__, *parts], sort_keys=True, default=str)
    return f"{step}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


# ---------------------------------------------------------------- cache hits whose files are gone
MAX_STALE_HOPS = 16
# (flow run id, step) -> why a cache hit was discarded; write_evidence records it in the lineage
STALE_REASONS: dict[tuple[str, str], str] = {}


def fresh_key(context, key: str, stale: Callable[[Any], list[str]], step: str) -> str:
    """`key`, unless the result cached under it names files that are gone or changed: then a key
    derived from that stale record, so Prefect misses and the step runs again (a cache hit must
    never hand the next step a missing folder). Derivation is deterministic, so the next run with
    the same inputs finds the fresh result under the derived key; a bounded chain covers results
    that went stale again. Prefect computes keys before it runs anything, so this is the place a
    cache policy can look at what a hit would return (an unreadable record is a miss anyway)."""
    store = getattr(context, "result_store", None)
    for _ in range(MAX_STALE_HOPS):
        try:
            if store is None or not store.exists(key):
                return key
            problems = stale(store.read(key).result)
        except Exception:  # an unreadable record: Prefect itself treats it as a miss
            return key
        if not problems:
            return key
        reason = "; ".join(problems)
        run = getattr(context, "task_run", None)
        if run is not None and run.flow_run_id is not None:
            STALE_REASONS[(str(run.flow_run_id), step)] = reason
        warn_in_run(f"{step}: the cached result under {key} is stale ({reason}): running the step again")
        key = f"{key.split('~', 1)[0]}~{hashlib.sha256((key + reason).encode()).hexdigest()[:12]}"
    return key


def train_outputs_problems(result: Any) -> list[str]:
    """Why a cached TrainResult cannot be reused: a relative path (it meant another working
    directory), a file gone, or a checkpoint whose files no longer hash to checkpoint_sha256."""
    from pathlib import Path

    from kd.hashing import digest_of, hash_tree

    paths = {"run folder": result.run_dir, "checkpoint": result.checkpoint_dir, "metrics": result.metrics_path,
             "train log": result.log_path, "held-out data": result.heldout_path}
    out = [f"{what} {p} is a relative path" for what, p in paths.items() if not Path(p).is_absolute()]
    out += [f"{what} {p} is gone" for what, p in paths.items() if Path(p).is_absolute() and not Path(p).exists()]
    ckpt = Path(result.checkpoint_dir)
    if not out and digest_of(hash_tree(ckpt, memo=True)) != result.checkpoint_sha256:
        out.append(f"checkpoint {ckpt} changed since it was written")
    return out


def provenance(run_name: str | None = None):
    """Which run is producing a result now (kept inside the result, so a cache hit names its producer)."""
    from prefect.runtime import flow_run, task_run

    from kd.results import Provenance

    def _id(x):
        return str(x) if x else None

    return Provenance(run_name=run_name or flow_run.name, flow_run_id=_id(flow_run.id), task_run_id=_id(task_run.id))


def warn_in_run(message: str) -> None:
    """To the task run's log (the UI shows it) when there is one, else to the kdflow logger."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # no run context (a unit test)
        log.warning(message)


def resume_fingerprint(resume_from: str | None) -> str | None:
    """`train.resume_from` in the training cache key: the folder and its content (trainer state
    and weights), or that it is missing (then training runs and names the bad path)."""
    if not resume_from:
        return None
    from pathlib import Path

    from kd.hashing import digest_of, hash_tree

    folder = Path(resume_from).expanduser().resolve()
    if not folder.is_dir():
        return f"{folder}:missing"
    return f"{folder}:{digest_of(hash_tree(folder, memo=True))}"
