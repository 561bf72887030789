"""Content-addressed folders built once: in a temporary sibling, then renamed into place.

    built = build_once(out, "info.json", lambda tmp: make_things(tmp))

A crash never leaves a half folder where readers look, and two processes building the same folder
at once end with one complete copy (the first to finish wins; the other's copy is discarded).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_once(out: Path, marker: str, build: Callable[[Path], None]) -> bool:
    """Make `out` with `build(tmp)` unless `out/marker` exists (the marker is written last by `build`).

    Returns True when this call built it. A folder at `out` without its marker (a leftover of an older
    layout) is replaced.
    """
    if (out / marker).is_file():
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        build(tmp)
        if (out / marker).is_file():  # a concurrent builder finished first: keep its folder
            return False
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:  # lost the race between the rmtree and the rename
            if not (out / marker).is_file():
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
