"""The Python steps of `make up` (deploy/local.sh), one process each instead of one `prefect` CLI per call.

    python -m flows.up pools --slots gpu-0       # before `prefect deploy`: work pools and the GPU slot limit
    python -m flows.up check --server-log LOG    # after it: the nightly's alert automation, then the health
                                                 # check (no traceback, the nightly scheduled; exit 1 if not)

The pieces are flows/alerts.py (automation + webhook block) and flows/health.py (server log, scheduler).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

POOLS = {"cpu": None, "gpu": 1}  # pool -> concurrency limit (gpu: one training per GPU worker)


def ensure_pools(slots: str) -> None:
    """The `cpu` and `gpu` process pools (gpu limited to 1 run) and the global limit `slots` (1 slot).

    Existing pools keep their settings except the gpu limit; an existing global limit keeps its size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from tasks.slots import ensure_limit

    with get_client(sync_client=True) as client:
        for pool, limit in POOLS.items():
            try:
                client.read_work_pool(pool)
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=limit))
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process", concurrency_limit=limit,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
    ensure_limit(slots, 1)
    print(f"  pools cpu, gpu (gpu concurrency limit 1); global concurrency limit {slots} (1 slot)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.up", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    pools = sub.add_parser("pools")
    pools.add_argument("--slots", default="gpu-0")
    check = sub.add_parser("check")
    check.add_argument("--server-log", type=Path, required=True)
    check.add_argument("--wait", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.step == "pools":
        ensure_pools(args.slots)
        return 0
    from flows import alerts, health

    print("alerts:")
    alerts.main([])
    print("scheduler:")
    return health.main(["--server-log", str(args.server_log), "--wait", str(args.wait)])


if __name__ == "__main__":
    sys.exit(main())
