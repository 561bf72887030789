"""File hashes for snapshots and the evidence manifest.

    from kd.hashing import sha256_file, hash_tree
    hash_tree("runs/x/checkpoint")   # {"model.safetensors": "<sha256>", ...}
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

# Files below this size are simply re-hashed; larger ones use the on-disk memo (see sha256_memo).
MEMO_MIN_BYTES = 1 << 20
_SKIP_DIRS = {".cache", ".git", ".locks"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (symlinks followed), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(
    directory: str | Path, *, include: list[str] | None = None, memo: bool = False, skip_caches: bool = True
) -> dict[str, str]:
    """`{relative posix path: sha256}` for every file under `directory`, sorted by path.

    Skips `.cache/`, `.git/`, `.locks/` and `*.lock` / `*.incomplete` files unless `skip_caches`
    is False (an evidence folder: every file counts). `include`, if given, keeps only these
    relative paths. `memo=True` reuses remembered hashes of unchanged big files (see
    `sha256_memo`); leave it off when the point is to re-check the bytes.
    """
    root = Path(directory)
    wanted = set(include) if include is not None else None
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or (wanted is not None and rel.as_posix() not in wanted):
            continue
        if skip_caches and (set(rel.parts[:-1]) & _SKIP_DIRS or p.name.endswith((".lock", ".incomplete"))):
            continue
        out[rel.as_posix()] = sha256_memo(p) if memo else sha256_file(p)
    return out


def sha256_memo(path: Path) -> str:
    """sha256 of a big file, remembered under $KDFLOW_HOME keyed by (real path, size, mtime, inode).

    A cached multi-GB snapshot then re-pulls in well under a second. A new download is a new file
    (new inode/mtime), so it is always hashed afresh.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    if st.st_size < MEMO_MIN_BYTES:
        return sha256_file(real)
    key = hashlib.sha1(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()
    memo = Path(os.environ.get("KDFLOW_HOME", "~/.cache/kdflow")).expanduser() / "sha256-memo" / key
    try:
        known = memo.read_text().strip()
        if _HEX64.match(known):
            return known
    except OSError:
        pass
    digest = sha256_file(real)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # the memo is an optimisation only
    return digest


def git_blob_sha1(path: str | Path) -> str:
    """The git object id of a file (what the hub lists as `oid` for non-LFS files)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_of(files: dict[str, str]) -> str:
    """One sha256 over a {path: sha256} listing, independent of where the files live."""
    h = hashlib.sha256()
    for path, digest in sorted(files.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


def files_digest(paths) -> str:
    """One sha256 over the content of `paths`, in their order, wherever they live (big files via sha256_memo)."""
    return digest_of({str(i): sha256_memo(Path(f)) for i, f in enumerate(paths)})


def hash_dir(root: str | Path) -> str:
    """One sha256 identifying a folder's content (e.g. a checkpoint)."""
    return digest_of(hash_tree(root))


def package_hash(folder: str | Path) -> str:
    """sha256 over one package folder's own .py files (not its sub-packages): a step's code in its cache key."""
    return digest_of({p.name: sha256_file(p) for p in sorted(Path(folder).glob("*.py"))})


def code_version() -> str:
    """sha256 over kdflow's own source (kd/ and backends/): a code change changes the cache keys."""
    root = Path(__file__).resolve().parent.parent
    files = {}
    for pkg in ("kd", "backends"):
        for p in sorted((root / pkg).rglob("*.py")):
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    return digest_of(files)
