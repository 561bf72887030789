"""A throw-away Prefect server (SQLite, 127.0.0.1, a free port) for the bench scripts that need its UI or API.

    from local_server import start_server      # bench scripts run as `python bench/<name>.py`
    proc, base = start_server(home)             # home: its PREFECT_HOME, server.log is written there
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, *, services: bool = True, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start --ui` with PREFECT_HOME=home; return (process, base URL) once healthy.

    services=False skips the scheduler and other loop services (a bench that only reads runs back)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": f"{base}/api"}
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
           "--port", str(port), "--ui", "--analytics-off", *([] if services else ["--no-services"])]
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((home / "server.log").read_text()[-3000:])
        try:
            if urllib.request.urlopen(f"{base}/api/health", timeout=2).read().strip() == b"true":
                return proc, base
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"Prefect server not healthy after {timeout_s:.0f} s: {home / 'server.log'}")
