"""Issue 21.5: users get the fast OpenMP setting by default, not only the tests. libgomp reads
OMP_WAIT_POLICY when torch loads; every entry point must have set it by then, and an explicit user
setting must win. Each case runs in a fresh interpreter that records the variable at torch's import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os environ_get)
        return None
sys.meta_path.insert(0, Spy())
import importlib
importlib.import_module(sys.argv[1])
# an entry point that has not loaded torch yet: the value torch would see when it does
print("AT_TORCH_IMPORT=" + str(seen[0] if seen else os.environ.get("OMP_WAIT_POLICY")))
""".replace("os environ_get", "os.environ.get('OMP_WAIT_POLICY')")

# the `kdflow` command, the flow a Prefect worker loads, and the module every torchrun rank runs
ENTRY_POINTS = ["flows.cli", "flows.distill", "kd.train.distributed.worker"]


def _policy_at_torch_import(module: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, env={**base, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().rsplit("AT_TORCH_IMPORT=", 1)[1]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_set_passive_before_torch_loads(module):
    assert _policy_at_torch_import(module) == "PASSIVE"


def test_an_explicit_user_setting_wins():
    assert _policy_at_torch_import("flows.cli", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
