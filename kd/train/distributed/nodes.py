"""Multi-node training (`train.rendezvous.nnodes = M > 1`): one rendezvous, one torchrun per node.

    with Rendezvous(cfg, run_dir, run_name) as rdzv:   # the training step: rdzv.endpoint, rdzv.id, rdzv.probe
        ... start M node jobs, each calling run_node(..., node_rank=i, endpoint=rdzv.endpoint, ...) ...
        for event in rdzv.new_events(): ...          # rank 0's KDFLOW events, whichever node holds rank 0

The step decides the rendezvous. Without `train.rendezvous.endpoint` it hosts torchrun's c10d store
itself (a `TCPStore` on a free port of this process, so no port can be taken between choosing and
binding) and hands `train.rendezvous.host:PORT` to every node, which joins as a client (`is_host=false`);
the process group's own store is then started by whichever node becomes rank 0 (torchrun shares it).
With an endpoint (e.g. a JobSet's `<jobset>-node-0-0.<subdomain>:29400`) that node hosts the store.
The rendezvous id is new for each attempt, so a retry never meets the previous attempt's state.

Rank 0 may land on any node (c10d orders nodes as they join). Its node appends rank 0's events to
`run_dir/launch/events-<rdzv id>.jsonl` on the shared `work_dir`, which the step tails (progress, logs) and
every other node's watchdog reads as a heartbeat. Before torchrun starts, each node checks it sees the
step's probe files under `work_dir` and `evidence_dir` (shared storage: the same path on every node).
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from kd.config import RunConfig
from kd.errors import ConfigError, TransientError
from kd.train.distributed.launch import raise_for_exit, supervise, torchrun_command, worker_env, write_spec
from kd.results import VocabAlignment

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def events_path(run_dir: Path, rdzv_id: str) -> Path:
    return Path(run_dir) / "launch" / f"events-{rdzv_id}.jsonl"


def probe_paths(cfg: RunConfig, run_dir: Path, rdzv_id: str) -> dict[str, Path]:
    """{config field: probe file} written by the step, read by every node."""
    evidence = Path(cfg.evidence_dir).expanduser().resolve()
    return {"work_dir": Path(run_dir) / "launch" / f"probe-{rdzv_id}",
            "evidence_dir": evidence / f".kdflow-probe-{rdzv_id}"}


class Rendezvous:
    """The step's side: the rendezvous endpoint and id, the shared-storage probes, rank 0's events."""

    def __init__(self, cfg: RunConfig, run_dir: Path, run_name: str):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in run_name)[-48:] or "kdflow"
        self.id = f"{safe}-{secrets.token_hex(4)}"
        self.probe = secrets.token_hex(8)
        self.store = None
        self.endpoint = cfg.train.rendezvous.endpoint
        self.store_is_elsewhere = False
        self._offset, self._partial = 0, b""

    def __enter__(self) -> "Rendezvous":
        from torch.distributed import TCPStore

        launch = self.run_dir / "launch"
        launch.mkdir(parents=True, exist_ok=True)
        (launch / "result.json").unlink(missing_ok=True)
        self.events = events_path(self.run_dir, self.id)
        self.events.write_bytes(b"")
        for field, path in probe_paths(self.cfg, self.run_dir, self.id).items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.probe)
            except OSError as err:
                raise ConfigError(f"{field}: cannot write {path}: {err}") from err
        if not self.endpoint:
            host = self.cfg.train.rendezvous.host
            self.store = TCPStore(host, 0, is_master=True, multi_tenant=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=self.cfg.train.rank_timeout_s))
            self.endpoint = f"[{host}]:{self.store.port}" if ":" in host and not host.startswith("[") \
                else f"{host}:{self.store.port}"
            self.store_is_elsewhere = True
        return self

    def __exit__(self, *exc) -> None:
        self.store = None  # the TCPStore server stops with its last reference
        for path in probe_paths(self.cfg, self.run_dir, self.id).values():
            path.unlink(missing_ok=True)

    def node_parameters(self, node_rank: int) -> dict:
        return {"node_rank": node_rank, "endpoint": self.endpoint, "rdzv_id": self.id,
                "store_is_elsewhere": self.store_is_elsewhere, "probe": self.probe}

    def new_events(self) -> Iterator[dict]:
        """Rank 0's events appended since the last call (complete lines only)."""
        try:
            with open(self.events, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event


def check_shared_storage(cfg: RunConfig, run_dir: Path, rdzv_id: str, probe: str, node_rank: int) -> None:
    """ConfigError (no retry) when this node does not see the step's probe files: work_dir or
    evidence_dir is not on storage every node sees at the same path."""
    for field, path in probe_paths(cfg, run_dir, rdzv_id).items():
        try:
            seen = path.read_text()
        except OSError:
            seen = None
        if seen != probe:
            raise ConfigError(
                f"{field}: node {node_rank} on host {socket.gethostname()} does not see {path}, which the training "
                f"step wrote: every node must see {field} at the same path (shared storage: NFS, CephFS, Lustre, "
                "a ReadWriteMany volume)")


def run_node(cfg: RunConfig, teacher_dir: str | Path, student_dir: str | Path, alignment: VocabAlignment,
             run_dir: str | Path, *, node_rank: int, endpoint: str, rdzv_id: str, store_is_elsewhere: bool,
             probe: str, prepared_dir: str | Path | None = None, teacher_cache=None,
             on_event: Callable[[dict], None] = lambda e: None,
             on_line: Callable[[str], None] = lambda line: None) -> dict:
    """Run torchrun for node `node_rank` of the job and wait for it. Returns {"node_rank", "host",
    "rank0"} (whether this node held rank 0); raises like run_torchrun (InputError class / TransientError).
    A node whose job goes silent (no rank-0 event on any node) for train.rank_timeout_s is killed."""
    run_dir = Path(run_dir)
    check_shared_storage(cfg, run_dir, rdzv_id, probe, node_rank)
    spec = write_spec(cfg, teacher_dir, student_dir, alignment, run_dir, prepared_dir, teacher_cache,
                      name=f"spec-node{node_rank}.json", clear_result=False)
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    cmd = torchrun_command(cfg, spec, endpoint=endpoint, rdzv_id=rdzv_id, store_is_elsewhere=store_is_elsewhere,
                           local_addr="127.0.0.1" if host in LOOPBACK else None)
    events = events_path(run_dir, rdzv_id)
    held_rank0 = []

    def relay(event: dict) -> None:  # only the node holding rank 0 gets events
        held_rank0 or held_rank0.append(True)
        with open(events, "a") as f:
            f.write(json.dumps(event, default=str) + "\n")
        on_event(event)

    on_line(f"node {node_rank}: " + " ".join(cmd))
    code, tail, errs = supervise(cmd, timeout_s=cfg.train.rank_timeout_s, on_event=relay, on_line=on_line,
                                 env=worker_env(), progress_file=events)
    if code == 0:
        return {"node_rank": node_rank, "host": socket.gethostname(), "rank0": bool(held_rank0)}
    if not errs and not held_rank0:
        raise TransientError(f"node {node_rank}: torchrun exited with status {code} ({' | '.join(tail[-6:])}); "
                             "a retry resumes from the last checkpoint")
    raise_for_exit(code, tail, errs)
