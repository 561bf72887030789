"""One GPU, one training: a Prefect global concurrency limit per GPU, taken around training.

    with gpu_slot(config.orchestration.gpu_slots):   # e.g. "gpu-0"
        train(...)

Why not just the `gpu` work pool's concurrency limit of 1? Pool limits bind only flow runs the
pool's workers start; an ad-hoc `kdflow run` on the same host trains in-process and would share the
GPU with a deployment run. A global concurrency limit binds every training task, however started.

The limit is created with 1 slot the first time it is missing (`make up` also creates it, with
`prefect gcl create`), so a fresh server serialises training at once. Raise it to share a big GPU
(`prefect gcl update gpu-0 --limit 2`); delete it to stop limiting (acquisition then logs a
warning and goes ahead instead of blocking). Waiting for a busy slot has no timeout: a queued
training starts when the running one releases its slot (a crashed holder's lease expires after
`LEASE_S` seconds without renewal).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

LEASE_S = 300.0  # renewed in the background while training runs; only a dead holder lets it lapse
log = logging.getLogger("kdflow.slots")


def ensure_limit(name: str, limit: int = 1) -> bool:
    """Create the global concurrency limit `name` with `limit` slots if the server lacks it.

    Returns True when this call created it. An existing limit is left as it is (its size is the
    operator's choice); a concurrent creation by another task counts as existing.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:
            return False
    log.info("created global concurrency limit %r with %d slot(s)", name, limit)
    return True


@contextmanager
def gpu_slot(name: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `name` (created if missing) for the block."""
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    with concurrency(name, occupy=1, lease_duration=LEASE_S, strict=False, raise_on_lease_renewal_failure=False):
        yield
