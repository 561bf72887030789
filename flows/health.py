"""What `make up` checks before it says the stack is up: the server is healthy in fact, not only alive.

A schedule that exists but never fires looks fine in the UI (the cron is shown) while the server's
scheduler fails on every pass; its traceback is only in the server log. So:

    python -m flows.health --server-log .kdflow/up/server.log   # what deploy/local.sh runs

fails (exit 1, printing the traceback) if the server log holds a traceback, or if the scheduler has not
created a scheduled run of `distill/nightly-smoke` within `--wait` seconds; otherwise prints when the
nightly runs next.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from pathlib import Path

NIGHTLY = "distill/nightly-smoke"
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.M)


def tracebacks(log_text: str) -> list[str]:
    """Each traceback in a log: from its header to the exception line (the first unindented line after it)."""
    found = []
    for m in _TRACEBACK.finditer(log_text):
        lines = log_text[m.start():].splitlines()
        end = next((i for i, line in enumerate(lines[1:], 1) if line and not line[0].isspace()), len(lines) - 1)
        found.append("\n".join(lines[: end + 1]))
    return found


def scheduled_runs(deployment: str = NIGHTLY) -> list:
    """The deployment's flow runs in state Scheduled, soonest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[dep.id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC)


def next_run_time(deployment: str = NIGHTLY, wait_s: float = 60.0, poll_s: float = 1.0) -> datetime | None:
    """When the scheduler will start the deployment next; None if it created no run within `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = scheduled_runs(deployment)
        if runs:
            return runs[0].next_scheduled_start_time or runs[0].expected_start_time
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def check(server_log: Path, deployment: str = NIGHTLY, wait_s: float = 60.0) -> tuple[bool, str]:
    """(ok, what to print)."""
    found = tracebacks(server_log.read_text(errors="replace"))
    if found:
        return False, (f"the Prefect server logged {len(found)} traceback(s) ({server_log}); the first:\n"
                       + found[0])
    when = next_run_time(deployment, wait_s)
    found = tracebacks(server_log.read_text(errors="replace"))  # the scheduler may have failed meanwhile
    if found:
        return False, f"the Prefect server logged a traceback ({server_log}):\n" + found[0]
    if when is None:
        return False, (f"the scheduler created no scheduled run of {deployment} within {wait_s:g} s: its "
                       f"schedule would never fire (see {server_log})")
    return True, f"next {deployment} run: {when.isoformat()} ({when.tzname() or 'UTC'})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.health", description=__doc__.split("\n\n")[0])
    p.add_argument("--server-log", type=Path, required=True)
    p.add_argument("--deployment", default=NIGHTLY)
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the first scheduled run")
    args = p.parse_args(argv)
    ok, message = check(args.server_log, args.deployment, args.wait)
    print(("  " if ok else "ERROR: ") + message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
