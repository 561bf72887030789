"""What every kdflow task shares: retry only transient errors, content-derived cache keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kd import __version__
from kd.errors import TransientError


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
