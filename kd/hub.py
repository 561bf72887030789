"""Model (and dataset) sources -> a local folder with a sha256 for every file.

    from kd.hub import pull_model, remote_download_bytes, resolve_commit, pull_dataset
    snap = pull_model(cfg.teacher, "teacher")   # ModelSnapshot: local_dir, resolved commit, file hashes
    need = remote_download_bytes(cfg.teacher)   # bytes still to download (None: unknown / not a hub repo)
    sha = resolve_commit(cfg.teacher)           # the 40-hex commit `revision` means now (cache when offline)
    folder = pull_dataset("owner/corpus")       # .txt/.jsonl/.parquet files of a hub dataset repo

Sources: a hub repo at a revision, a local folder, or `tiny:teacher` / `tiny:student`
(kd.tiny.ensure_tiny, under $KDFLOW_HOME/tiny); a GGUF file, local or `gguf_file` in a hub repo
(converted once to a HF folder by kd.gguf); a student pruned from the teacher (kd.prune). Hub repos go through
`huggingface_hub.snapshot_download` into the standard HF cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
HF_HUB_OFFLINE apply), root-level safetensors, json and tokenizer files only. On top of that:
- a pickle-only repo is refused from its file listing, before anything is downloaded;
- every file is checked against the listing (sha256 for LFS files, git blob sha1 for the others)
  because huggingface_hub does not; a bad blob is evicted and fetched once more, then it fails;
- errors are classified, transient ones retried, and hub requests get finite timeouts
  (kd.hubclient);
- HF_TOKEN (or `token=`) is sent to the hub and never logged, put in messages or returned.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Literal

from kd.config import ModelRef
from kd.errors import DataError, ModelError
from kd.hashing import git_blob_sha1, hash_tree, sha256_file, sha256_memo
from kd.hubclient import Source, classified, install_timeouts, offline_error, storage_folder, with_retries
from kd.redact import scrub
from kd.results import ModelSnapshot

__all__ = ["pull_model", "pull_dataset", "remote_download_bytes", "resolve_commit", "select_files",
           "sha256_file", "hash_tree"]
log = logging.getLogger("kdflow.hub")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")  # configs, tokenizers, chat templates
DATA_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")  # what kd.data reads (kd.data.sources.DATA_SUFFIXES)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
Select = Callable[[list[str]], list[str]]


def select_files(paths: list[str], repo: str, *, trust_remote_code: bool = False) -> list[str]:
    """The root-level files kdflow needs from a model listing; ModelError for pickle-only or no weights.

    Weights: `model*.safetensors` when present (skips duplicate formats such as
    `consolidated.safetensors`), else any root `*.safetensors`. Plus configs, tokenizer files and,
    only with trust_remote_code, the repo's `*.py`.
    """
    root = [p for p in paths if "/" not in p]
    weights = [p for p in root if fnmatchcase(p, "model*.safetensors")] or [
        p for p in root if p.endswith(".safetensors")
    ]
    if not weights:
        pickles = sorted(p for p in root if p.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelError(
                f"{repo}: only pickle weights ({', '.join(pickles[:3])}); kdflow loads safetensors only "
                "(pickle can run code on load). Use a revision or copy of the model with *.safetensors weights."
            )
        raise ModelError(f"{repo}: no *.safetensors weights found")
    if "config.json" not in root:
        raise ModelError(f"{repo}: no config.json, not a transformers model")
    patterns = _SIDE_FILES + (("*.py",) if trust_remote_code else ())
    other = [p for p in root if not p.endswith(".safetensors") and any(fnmatchcase(p, g) for g in patterns)]
    return sorted(weights + other)


# --------------------------------------------------------------------------- public API
def pull_model(
    ref: ModelRef,
    role: Literal["teacher", "student"],
    *,
    cache_dir: str | None = None,
    token: str | None = None,
    teacher: ModelSnapshot | None = None,
    dtype: str = "float32",
    data=None,
) -> ModelSnapshot:
    """Make `ref` available as a local folder and hash it. See the module docstring for the rules.

    `teacher`: the teacher's snapshot, needed when `ref` is a student built from it (`init`).
    `dtype`: what a GGUF source is dequantized to ("float32" | "bfloat16").
    `data`: the run's DataConfig: a student pruned by a measured strategy calibrates on its training split.
    """
    if ref.kind == "pruned":
        if teacher is None:
            raise ModelError(f"{role}: init.from_teacher needs the teacher's snapshot")
        from kd.prune import ensure_pruned

        folder, init = ensure_pruned(teacher, ref.init.from_teacher, data)
        return _snapshot_folder(ref, role, folder, "pruned").model_copy(update={"init": init})
    if ref.is_gguf:
        return _pull_gguf(ref, role, cache_dir, _token(token), dtype)
    if ref.kind == "tiny":
        from kd.tiny import ensure_tiny

        teacher_dir, student_dir = ensure_tiny(None)  # $KDFLOW_HOME/tiny, built once
        return _snapshot_folder(ref, role, teacher_dir if ref.repo == "tiny:teacher" else student_dir, "tiny")
    if ref.kind == "local":
        folder = Path(ref.repo).expanduser().resolve()
        if not folder.is_dir():
            raise ModelError(f"{ref.repo}: local model folder not found")
        return _snapshot_folder(ref, role, folder, "local")
    src = Source(ref.repo, ref.revision)
    select = _model_selector(ref)
    commit, folder, files, size = _fetch(src, select, cache_dir, _token(token))
    return ModelSnapshot(role=role, repo=ref.repo, revision=ref.revision, kind="hub", resolved_commit=commit,
                         local_dir=folder, files=files, total_bytes=size)


def pull_dataset(repo: str, revision: str = "main", *, cache_dir: str | None = None,
                 token: str | None = None) -> str:
    """Local folder with the .txt/.jsonl/.parquet files (any depth) of hub dataset `repo`, verified."""
    def select(paths: list[str]) -> list[str]:
        wanted = sorted(p for p in paths if p.lower().endswith(DATA_SUFFIXES))
        if not wanted:
            raise DataError(f"hf-dataset:{repo}@{revision}: no {'/'.join(DATA_SUFFIXES)} files in the repo")
        return wanted

    return _fetch(Source(repo, revision, "dataset"), select, cache_dir, _token(token))[1]


def remote_download_bytes(ref: ModelRef, token: str | None = None, *, cache_dir: str | None = None) -> int | None:
    """Bytes `pull_model(ref)` would download now (files already in the cache count 0).

    None for local/tiny models, offline mode, or when the hub cannot be asked (logged, never raised).
    """
    if ref.kind != "hub":
        return None
    from huggingface_hub import constants

    src, token = Source(ref.repo, ref.revision), _token(token)
    if constants.is_offline_mode():
        log.info("%s: offline mode (HF_HUB_OFFLINE), download size unknown", src.where)
        return None
    try:
        install_timeouts()
        commit, listing = classified(lambda: _resolve_and_list(src, token), src, token)
        wanted = _model_selector(ref)(list(listing))
    except Exception as err:  # sizing is advisory: pull_model reports the real problem
        log.warning("%s: cannot size the download: %s", src.where, scrub(str(err), [token]))
        return None
    snap = Path(storage_folder(src, cache_dir)) / "snapshots" / commit
    return sum(_expected(listing[p]).size for p in wanted if not (snap / p).is_file())


def resolve_commit(ref: ModelRef, token: str | None = None, *, cache_dir: str | None = None) -> str:
    """The 40-hex commit `ref.revision` names now; offline, the one the HF cache recorded.

    For cache keys: `pull_model` would fetch exactly this commit. Raises ModelError / TransientError.
    """
    from huggingface_hub import HfApi, constants

    src, token = Source(ref.repo, ref.revision), _token(token)
    if _HEX40.match(ref.revision):
        return ref.revision
    if constants.is_offline_mode():
        return _cached_commit(src, cache_dir)
    install_timeouts()
    return with_retries(lambda: HfApi(token=token).model_info(ref.repo, revision=ref.revision).sha, src, token,
                        "resolving the revision")


# --------------------------------------------------------------------------- GGUF files
def _pull_gguf(ref: ModelRef, role: str, cache_dir: str | None, token: str | None, dtype: str) -> ModelSnapshot:
    """A GGUF file (local, or pulled and verified from the hub), converted once to a HF folder (kd.gguf)."""
    from kd.gguf import ensure_hf_folder

    if ref.kind == "local":
        path = Path(ref.repo).expanduser().resolve()
        folder, record = ensure_hf_folder(path, dtype)
        commit = "local"
    else:
        src = Source(ref.repo, ref.revision)
        commit, snap_dir, _, _ = _fetch(src, _model_selector(ref), cache_dir, token)
        folder, record = ensure_hf_folder(Path(snap_dir) / str(ref.gguf_file), dtype,
                                          source=f"{ref.repo}@{commit}:{ref.gguf_file}")
    snap = _snapshot_folder(ref, role, folder, "local" if commit == "local" else "hub")
    return snap.model_copy(update={"resolved_commit": commit, "gguf": record})


def _gguf_selector(ref: ModelRef) -> Select:
    def select(paths: list[str]) -> list[str]:
        if ref.gguf_file not in paths:
            found = sorted(p for p in paths if p.lower().endswith(".gguf"))
            raise ModelError(f"{ref.repo}@{ref.revision}: no file {ref.gguf_file!r} (gguf_file); "
                             f"GGUF files in the repo: {', '.join(found[:10]) or 'none'}")
        return [str(ref.gguf_file)]
    return select


# --------------------------------------------------------------------------- local and tiny folders
def _snapshot_folder(ref: ModelRef, role: str, folder: Path, kind: str) -> ModelSnapshot:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    files = hash_tree(folder, include=select_files(names, str(folder), trust_remote_code=ref.trust_remote_code),
                      memo=True)
    return ModelSnapshot(
        role=role, repo=ref.repo, revision=ref.revision, kind=kind, resolved_commit="local",
        local_dir=str(folder), files=files, total_bytes=sum((folder / p).stat().st_size for p in files),
    )


# --------------------------------------------------------------------------- hub
@dataclass(frozen=True)
class _Expect:
    size: int
    blob_sha1: str | None
    lfs_sha256: str | None


def _token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def _model_selector(ref: ModelRef) -> Select:
    if ref.gguf_file is not None:
        return _gguf_selector(ref)
    return lambda paths: select_files(paths, ref.repo, trust_remote_code=ref.trust_remote_code)


def _expected(entry) -> _Expect:
    lfs = entry.lfs
    return _Expect(lfs.size if lfs else entry.size, entry.blob_id, lfs.sha256 if lfs else None)


def _fetch(src: Source, select: Select, cache_dir: str | None, token: str | None):
    """(commit, snapshot folder, {path: sha256}, total bytes) of the selected files, verified."""
    from huggingface_hub import constants

    install_timeouts()
    if constants.is_offline_mode():
        return _fetch_cached(src, select, cache_dir)
    commit, listing = with_retries(lambda: _resolve_and_list(src, token), src, token, "listing files")
    wanted = select(list(listing))  # refuses (e.g. pickle-only) before any download
    expected = {p: _expected(listing[p]) for p in wanted}

    def download() -> str:
        from huggingface_hub import snapshot_download

        return snapshot_download(src.repo, repo_type=src.repo_type, revision=commit, cache_dir=cache_dir,
                                 token=token, allow_patterns=[glob.escape(p) for p in wanted],
                                 etag_timeout=constants.HF_HUB_ETAG_TIMEOUT)

    folder = with_retries(download, src, token, "downloading")
    files, bad = _verify(folder, expected)
    if bad:
        log.warning("%s@%s: %s; evicting and downloading once more", src.repo, commit, "; ".join(bad.values()))
        _evict(folder, bad)
        folder = with_retries(download, src, token, "downloading")
        files, bad = _verify(folder, expected)
        if bad:
            _evict(folder, bad)  # never leave a known-bad blob in the cache
            raise src.error(
                f"{src.repo}@{commit}: downloaded twice and still does not match the hub listing: "
                + "; ".join(bad.values())
            )
    _record_ref(src, commit, cache_dir)
    return commit, folder, files, sum(e.size for e in expected.values())


def _resolve_and_list(src: Source, token: str | None):
    """(40-hex commit, {path: RepoFile}) for the revision, from the hub (datasets: all depths)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    commit = src.revision if _HEX40.match(src.revision) else api.repo_info(
        src.repo, repo_type=src.repo_type, revision=src.revision).sha
    if not commit or not _HEX40.match(commit):
        raise src.error(f"{src.where}: the hub returned no commit id ({commit!r})")
    entries = api.list_repo_tree(src.repo, repo_type=src.repo_type, revision=commit,
                                 recursive=src.repo_type == "dataset")
    return commit, {e.path: e for e in entries if isinstance(e, RepoFile)}


def _cached_commit(src: Source, cache_dir: str | None) -> str:
    ref = Path(storage_folder(src, cache_dir)) / "refs" / src.revision
    if _HEX40.match(src.revision):
        return src.revision
    if not ref.is_file():
        raise offline_error(src, cache_dir)
    return ref.read_text().strip()


def _fetch_cached(src: Source, select: Select, cache_dir: str | None):
    """HF_HUB_OFFLINE: the cached snapshot of the revision, complete and matching its blob names."""
    from huggingface_hub import get_cached_repo_tree

    commit = _cached_commit(src, cache_dir)
    folder = Path(storage_folder(src, cache_dir)) / "snapshots" / commit
    if not folder.is_dir():
        raise offline_error(src, cache_dir)
    try:  # the listing huggingface_hub cached with the snapshot tells whether it is complete
        listing = {f.path: f.size for f in get_cached_repo_tree(
            src.repo, repo_type=src.repo_type, revision=commit, cache_dir=cache_dir)}
    except Exception:
        listing = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    # In the HF cache a blob is named by its hub id: sha256 for LFS files, git sha1 for the others.
    expected = {}
    for p in select(list(listing)):
        blob = os.path.basename(os.path.realpath(folder / p))
        expected[p] = _Expect(listing[p], blob if _HEX40.match(blob) else None, blob if _HEX64.match(blob) else None)
    files, bad = _verify(str(folder), expected)
    if bad:
        raise src.error(
            f"{src.repo}@{commit}: the cached snapshot is incomplete or corrupt and HF_HUB_OFFLINE is set: "
            f"{'; '.join(bad.values())}. Pull it once online."
        )
    return commit, str(folder), files, sum(e.size for e in expected.values())


def _verify(folder: str, expected: dict[str, _Expect]) -> tuple[dict[str, str], dict[str, str]]:
    """({path: sha256} of good files, {path: what is wrong} of bad ones)."""
    files, bad = {}, {}
    for path, exp in sorted(expected.items()):
        p = Path(folder) / path
        if not p.is_file():
            bad[path] = f"{path}: missing"
            continue
        size = p.stat().st_size
        if size != exp.size:
            bad[path] = f"{path}: size {size} != listed {exp.size}"
            continue
        digest = sha256_memo(p)
        if exp.lfs_sha256 is not None and digest != exp.lfs_sha256:
            bad[path] = f"{path}: sha256 {digest[:12]}… != listed {exp.lfs_sha256[:12]}…"
        elif exp.lfs_sha256 is None and exp.blob_sha1 is not None and git_blob_sha1(p) != exp.blob_sha1:
            bad[path] = f"{path}: git blob id != listed {exp.blob_sha1[:12]}…"
        else:
            files[path] = digest
    return files, bad


def _evict(folder: str, bad: dict[str, str]) -> None:
    """Delete the snapshot entry and the blob it points to, so the next download fetches it again."""
    for path in bad:
        p = Path(folder) / path
        blob = os.path.realpath(p)
        p.unlink(missing_ok=True)
        if blob != str(p):
            Path(blob).unlink(missing_ok=True)


def _record_ref(src: Source, commit: str, cache_dir: str | None) -> None:
    """Write refs/<revision> -> commit as huggingface_hub does, so HF_HUB_OFFLINE finds this snapshot.

    (We download at the resolved commit, so huggingface_hub itself records no ref.)
    """
    if src.revision == commit:
        return
    path = Path(storage_folder(src, cache_dir)) / "refs" / src.revision
    try:
        if path.is_file() and path.read_text() == commit:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("%s: could not record ref %s -> %s: %s", src.repo, src.revision, commit, err)
