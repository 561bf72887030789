"""Issue 21.2: requirements.lock is what `make` installs; it must agree with pyproject.toml, and the
environment the tests run in must be the locked one (no drift between a newcomer's install and CI's)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"


def _direct_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {canonicalize_name(r.name): r for r in reqs}


def parse_lock(text: str) -> dict[str, tuple[str, set[str]]]:
    """{name: (version, {who requires it})} from a pip-compile lock file."""
    out: dict[str, tuple[str, set[str]]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line)  # name[extras]==version
        if m:
            name = canonicalize_name(m.group(1))
            out[name] = (m.group(2), set())
            continue
        via = re.match(r"^\s+#\s+(?:via\s+)?(.+?)\s*$", line)
        if name and via and via.group(1) not in ("via",):
            out[name][1].add(via.group(1))
    return out


def lock_disagreements(direct: dict[str, Requirement], lock: dict[str, tuple[str, set[str]]]) -> list[str]:
    """Every direct requirement locked at a version it allows, and nothing locked as a direct
    requirement that pyproject.toml no longer asks for."""
    problems = []
    for name, req in direct.items():
        if name not in lock:
            problems.append(f"{name}: in pyproject.toml, not in requirements.lock (run `make lock`)")
        elif not req.specifier.contains(Version(lock[name][0]), prereleases=True):
            problems.append(f"{name}: locked {lock[name][0]} is outside pyproject.toml's {req.specifier}")
    for name, (_, via) in lock.items():
        if "kdflow (pyproject.toml)" in via and name not in direct:
            problems.append(f"{name}: locked as a kdflow requirement that pyproject.toml no longer lists")
    return problems


def test_lock_agrees_with_pyproject():
    assert lock_disagreements(_direct_requirements(), parse_lock(LOCK.read_text())) == []


def test_a_drifted_pyproject_is_caught():
    direct, lock = _direct_requirements(), parse_lock(LOCK.read_text())
    drifted = {**direct, "prefect": Requirement("prefect>=4"), "rich-new-dep": Requirement("rich-new-dep")}
    problems = lock_disagreements(drifted, lock)
    assert any(p.startswith("prefect: locked") for p in problems) and any("rich-new-dep" in p for p in problems)
    removed = {k: v for k, v in direct.items() if k != "gguf"}
    assert lock_disagreements(removed, lock) == ["gguf: locked as a kdflow requirement that pyproject.toml no longer lists"]


def test_every_locked_package_has_hashes():
    text = LOCK.read_text()
    pins = re.findall(r"^[A-Za-z0-9_.\-]+(?:\[[^\]]*\])?==\S+ \\\n(?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", text, re.M)
    assert len(pins) == len(parse_lock(text)) > 100


def test_the_environment_is_the_locked_one():
    """What `make` installed from the lock is what runs: each locked package at its locked version."""
    wrong = []
    for name, (version, _) in parse_lock(LOCK.read_text()).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: locked {version}, not installed")
            continue
        if Version(have) != Version(version):
            wrong.append(f"{name}: locked {version}, installed {have}")
    assert wrong == []
