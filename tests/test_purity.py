"""The pure core never imports prefect (convention 1 of DESIGN.md)."""

import subprocess
import sys
from pathlib import Path

KD = Path(__file__).resolve().parent.parent / "kd"


def test_kd_modules_do_not_import_prefect():
    # every module of the core, packages included (kd/train/, kd/evidence/, ...)
    modules = sorted(".".join(p.relative_to(KD.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in KD.rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(len(sys.modules)); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=KD.parent)
    assert proc.returncode == 0, proc.stderr or "a kd module imported prefect"
    assert int(proc.stdout.strip()) > 100  # the modules really were imported
