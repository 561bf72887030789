"""Model sources -> a local folder with a sha256 for every file: hub repos, local folders, tiny models.

    from kd.hub import pull_model, remote_download_bytes
    snap = pull_model(cfg.teacher, "teacher")     # ModelSnapshot: local_dir, resolved commit, hashes
    need = remote_download_bytes(cfg.teacher)     # bytes still to download (None: unknown / not a hub repo)

Hub repos go through `huggingface_hub.snapshot_download` into the standard HF cache (HF_HOME,
HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE all apply), root-level safetensors, json and tokenizer files
only. On top of what huggingface_hub does, `pull_model`:
- refuses a pickle-only repo from its file listing, before anything is downloaded;
- checks every file against the listing (sha256 for LFS files, git blob sha1 for the rest), because
  huggingface_hub does not: a bad blob is evicted and fetched once more, then it is a ModelError;
- retries transient failures (connection errors, timeouts, HTTP 408/429/5xx) with a bounded backoff
  and raises TransientError when they persist; permanent ones (missing repo, gated repo, unknown
  revision, missing file, offline and not cached) become a ModelError that says what to do;
- puts finite timeouts on hub requests (huggingface_hub's shared client has none by default).
HF_TOKEN (or `token=`) is sent to the hub and never logged, put in messages or returned.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Literal, TypeVar

from kd.config import ModelRef
from kd.errors import ModelError, TransientError
from kd.hashing import git_blob_sha1, hash_tree, sha256_file, sha256_memo
from kd.results import ModelSnapshot

log = logging.getLogger("kdflow.hub")

# Retries of transient hub failures inside one pull (Prefect task retries come on top of these).
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 8.0
# Timeouts filled into hub requests that would otherwise wait forever (per connect / per read).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NEEDED = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken")  # weights, configs, tokenizers
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
__all__ = ["pull_model", "remote_download_bytes", "select_files", "sha256_file", "hash_tree"]
T = TypeVar("T")


# --------------------------------------------------------------------------- which files a model needs
def select_files(paths: list[str], repo: str, *, trust_remote_code: bool = False) -> list[str]:
    """The root-level files kdflow needs from a repo/folder listing; ModelError for pickle-only or no weights.

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
    patterns = _NEEDED[1:] + (("*.py",) if trust_remote_code else ())
    other = [p for p in root if not p.endswith(".safetensors") and any(fnmatchcase(p, g) for g in patterns)]
    return sorted(weights + other)


# --------------------------------------------------------------------------- public API
def pull_model(
    ref: ModelRef,
    role: Literal["teacher", "student"],
    *,
    cache_dir: str | None = None,
    token: str | None = None,
) -> ModelSnapshot:
    """Make `ref` available as a local folder and hash it. See the module docstring for the rules."""
    if ref.kind == "tiny":
        from kd.tiny import ensure_tiny

        teacher_dir, student_dir = ensure_tiny(None)  # $KDFLOW_HOME/tiny, built once
        return _snapshot_folder(ref, role, teacher_dir if ref.repo == "tiny:teacher" else student_dir, "tiny")
    if ref.kind == "local":
        folder = Path(ref.repo).expanduser().resolve()
        if not folder.is_dir():
            raise ModelError(f"{ref.repo}: local model folder not found")
        return _snapshot_folder(ref, role, folder, "local")
    return _pull_hub(ref, role, cache_dir=cache_dir, token=token or os.environ.get("HF_TOKEN") or None)


def remote_download_bytes(ref: ModelRef, token: str | None = None, *, cache_dir: str | None = None) -> int | None:
    """Bytes `pull_model(ref)` would download now (files already in the cache count 0).

    None for local/tiny models, offline mode, or when the hub cannot be asked (logged, never raised).
    """
    if ref.kind != "hub":
        return None
    from huggingface_hub import constants

    if constants.is_offline_mode():
        log.info("%s: offline mode (HF_HUB_OFFLINE), download size unknown", ref.repo)
        return None
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        _install_timeouts()
        commit, listing = _classified(lambda: _resolve_and_list(ref, token), ref, token)
        wanted = select_files(list(listing), ref.repo, trust_remote_code=ref.trust_remote_code)
    except Exception as err:  # sizing is advisory: pull_model reports the real problem
        log.warning("%s@%s: cannot size the download: %s", ref.repo, ref.revision, _scrub(str(err), token))
        return None
    snap = Path(_storage_folder(ref.repo, cache_dir)) / "snapshots" / commit
    return sum(listing[p].size for p in wanted if not (snap / p).is_file())


# --------------------------------------------------------------------------- local and tiny folders
def _snapshot_folder(ref: ModelRef, role: str, folder: Path, kind: str) -> ModelSnapshot:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    wanted = select_files(names, str(folder), trust_remote_code=ref.trust_remote_code)
    files = hash_tree(folder, include=wanted, memo=True)
    return ModelSnapshot(
        role=role, repo=ref.repo, revision=ref.revision, kind=kind, resolved_commit="local",
        local_dir=str(folder), files=files, total_bytes=sum((folder / p).stat().st_size for p in files),
    )


# --------------------------------------------------------------------------- hub
@dataclass(frozen=True)
class _Expected:
    size: int
    blob_sha1: str | None
    lfs_sha256: str | None


def _pull_hub(ref: ModelRef, role: str, *, cache_dir: str | None, token: str | None) -> ModelSnapshot:
    from huggingface_hub import constants

    _install_timeouts()
    if constants.is_offline_mode():
        return _pull_cached(ref, role, cache_dir)
    commit, listing = _with_retries(lambda: _resolve_and_list(ref, token), ref, token, "listing files")
    wanted = select_files(list(listing), ref.repo, trust_remote_code=ref.trust_remote_code)
    expected = {
        p: _Expected(listing[p].size, listing[p].blob_id, listing[p].lfs.sha256 if listing[p].lfs else None)
        for p in wanted
    }
    download = lambda: _download(ref, commit, wanted, cache_dir, token)  # noqa: E731
    folder = _with_retries(download, ref, token, "downloading")
    files, bad = _verify(folder, expected)
    if bad:
        log.warning("%s@%s: %s; evicting and downloading once more", ref.repo, commit, "; ".join(bad.values()))
        _evict(folder, bad)
        folder = _with_retries(download, ref, token, "downloading")
        files, bad = _verify(folder, expected)
        if bad:
            _evict(folder, bad)  # never leave a known-bad blob in the cache
            raise ModelError(
                f"{ref.repo}@{commit}: downloaded twice and still does not match the hub listing: "
                + "; ".join(bad.values())
            )
    _record_ref(ref, commit, cache_dir)
    return ModelSnapshot(
        role=role, repo=ref.repo, revision=ref.revision, kind="hub", resolved_commit=commit,
        local_dir=folder, files=files, total_bytes=sum(e.size for e in expected.values()),
    )


def _pull_cached(ref: ModelRef, role: str, cache_dir: str | None) -> ModelSnapshot:
    """HF_HUB_OFFLINE: the cached snapshot of `ref.revision`, complete and matching its blob names."""
    from huggingface_hub import get_cached_repo_tree

    storage = Path(_storage_folder(ref.repo, cache_dir))
    commit = ref.revision if _HEX40.match(ref.revision) else None
    if commit is None and (storage / "refs" / ref.revision).is_file():
        commit = (storage / "refs" / ref.revision).read_text().strip()
    folder = storage / "snapshots" / (commit or "-")
    if commit is None or not folder.is_dir():
        raise _offline_error(ref, cache_dir)
    try:  # the listing huggingface_hub cached with the snapshot tells whether it is complete
        listing = {f.path: f.size for f in get_cached_repo_tree(ref.repo, revision=commit, cache_dir=cache_dir)}
    except Exception:
        listing = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    wanted = select_files(list(listing), f"{ref.repo} (cached at {folder})", trust_remote_code=ref.trust_remote_code)
    # In the HF cache a blob is named by its hub id: sha256 for LFS files, git sha1 for the others.
    expected = {}
    for p in wanted:
        blob = os.path.basename(os.path.realpath(folder / p))
        expected[p] = _Expected(listing[p], blob if _HEX40.match(blob) else None, blob if _HEX64.match(blob) else None)
    files, bad = _verify(str(folder), expected)
    if bad:
        raise ModelError(
            f"{ref.repo}@{commit}: the cached snapshot is incomplete or corrupt and HF_HUB_OFFLINE is set: "
            f"{'; '.join(bad.values())}. Pull it once online."
        )
    return ModelSnapshot(
        role=role, repo=ref.repo, revision=ref.revision, kind="hub", resolved_commit=commit,
        local_dir=str(folder), files=files, total_bytes=sum(e.size for e in expected.values()),
    )


def _resolve_and_list(ref: ModelRef, token: str | None):
    """(40-hex commit, {root path: RepoFile}) for `ref.revision`, from the hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    commit = ref.revision if _HEX40.match(ref.revision) else api.model_info(ref.repo, revision=ref.revision).sha
    if not commit or not _HEX40.match(commit):
        raise ModelError(f"{ref.repo}@{ref.revision}: the hub returned no commit id ({commit!r})")
    entries = api.list_repo_tree(ref.repo, revision=commit, recursive=False)
    return commit, {e.path: e for e in entries if isinstance(e, RepoFile)}


def _download(ref: ModelRef, commit: str, wanted: list[str], cache_dir: str | None, token: str | None) -> str:
    from huggingface_hub import constants, snapshot_download

    return snapshot_download(
        ref.repo, revision=commit, cache_dir=cache_dir, token=token,
        allow_patterns=[glob.escape(p) for p in wanted], etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
    )


def _verify(folder: str, expected: dict[str, _Expected]) -> tuple[dict[str, str], dict[str, str]]:
    """({path: sha256} of good files, {path: what is wrong} of bad ones)."""
    files, bad = {}, {}
    for path, exp in sorted(expected.items()):
        p = Path(folder) / path
        if not p.is_file():
            bad[path] = f"{path}: missing after download"
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


def _record_ref(ref: ModelRef, commit: str, cache_dir: str | None) -> None:
    """Write refs/<revision> -> commit, as huggingface_hub does, so HF_HUB_OFFLINE finds this snapshot.

    (We download at the resolved commit, so huggingface_hub itself records no ref.)
    """
    if ref.revision == commit:
        return
    path = Path(_storage_folder(ref.repo, cache_dir)) / "refs" / ref.revision
    try:
        if path.is_file() and path.read_text() == commit:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("%s: could not record ref %s -> %s: %s", ref.repo, ref.revision, commit, err)


def _storage_folder(repo: str, cache_dir: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"))


# --------------------------------------------------------------------------- errors, retries, timeouts
def _with_retries(fn: Callable[[], T], ref: ModelRef, token: str | None, what: str) -> T:
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return _classified(fn, ref, token)
        except _Transient as err:
            if attempt == RETRY_ATTEMPTS:
                raise TransientError(
                    f"{ref.repo}@{ref.revision}: {what} failed {attempt} times, last: {err}"
                ) from err.__cause__
            log.warning("%s@%s: %s: %s; retry %d/%d in %.1f s", ref.repo, ref.revision, what, err,
                        attempt, RETRY_ATTEMPTS - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


class _Transient(Exception):
    """Internal: a failure worth retrying (message already scrubbed)."""


def _classified(fn: Callable[[], T], ref: ModelRef, token: str | None) -> T:
    """Run fn; turn hub failures into ModelError (permanent) or _Transient (retry); re-raise the rest."""
    try:
        return fn()
    except (ModelError, TransientError):
        raise
    except Exception as err:
        problem = _classify(err, ref, token)
        if isinstance(problem, ModelError):
            raise problem from err
        if problem is None:
            raise
        raise _Transient(problem) from err


def _classify(err: BaseException, ref: ModelRef, token: str | None) -> ModelError | str | None:
    """ModelError for a permanent failure, a reason string for a transient one, None if not a hub error."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__

    def find(kind):
        return next((c for c in chain if isinstance(c, kind)), None)

    where = f"{ref.repo}@{ref.revision}"
    if find(GatedRepoError):  # a RepositoryNotFoundError subclass: must come first
        return ModelError(
            f"{ref.repo}: gated repo. Accept its licence at {constants.ENDPOINT}/{ref.repo} with your "
            "account, then set HF_TOKEN to a read token of that account."
        )
    if find(RevisionNotFoundError):
        return ModelError(f"{ref.repo}: revision {ref.revision!r} not found (no such branch, tag or commit)")
    if find(RepositoryNotFoundError):
        return ModelError(
            f"{ref.repo}: repository not found on {constants.ENDPOINT} (check the id; if it is private, set HF_TOKEN)"
        )
    if missing := find(RemoteEntryNotFoundError):
        return ModelError(f"{where}: a listed file is missing on the hub: {_scrub(str(missing), token)[:300]}")
    if find(OfflineModeIsEnabled):
        return _offline_error(ref, None)
    transport = find(httpx2.TransportError)
    if transport is not None and not isinstance(transport, httpx2.ProxyError):
        return f"{type(transport).__name__}: {_scrub(str(transport), token)[:200]}"
    http = find(HfHubHTTPError)
    status = getattr(getattr(http, "response", None), "status_code", None)
    if http is not None and status is not None:
        if status in (408, 429) or status >= 500:
            return f"HTTP {status}"
        if status in (401, 403):
            return ModelError(f"{where}: access denied (HTTP {status}); set HF_TOKEN to a token with read access")
        return ModelError(f"{where}: hub answered HTTP {status}: {_scrub(str(http), token)[:300]}")
    if (c := find((ConnectionError, TimeoutError))) is not None:
        return f"{type(c).__name__}: {_scrub(str(c), token)[:200]}"
    if find(LocalEntryNotFoundError):  # no transient cause in the chain: the cache just lacks it
        return _offline_error(ref, None)
    return None


def _offline_error(ref: ModelRef, cache_dir: str | None) -> ModelError:
    return ModelError(
        f"{ref.repo}@{ref.revision}: not in the HF cache ({_storage_folder(ref.repo, cache_dir)}) and the hub "
        "cannot be used (HF_HUB_OFFLINE is set or downloads are disabled). Pull it once online."
    )


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


_TIMEOUTS_INSTALLED = False


def _install_timeouts() -> None:
    """Give huggingface_hub's shared client finite timeouts (it uses timeout=None by default)."""
    global _TIMEOUTS_INSTALLED
    if _TIMEOUTS_INSTALLED:
        return
    try:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils._http import default_client_factory
    except ImportError:  # a huggingface_hub without this hook: keep its own client
        log.debug("huggingface_hub client factory not found; hub timeouts left as they are")
        return

    def fill(request) -> None:
        # Only fills what the caller left unbounded: explicit timeouts (etag, download) are kept.
        given = request.extensions.get("timeout") or {}
        default = {"connect": CONNECT_TIMEOUT_S, "read": READ_TIMEOUT_S, "write": READ_TIMEOUT_S,
                   "pool": CONNECT_TIMEOUT_S}
        request.extensions["timeout"] = {k: v if given.get(k) is None else given[k] for k, v in default.items()}

    def factory():
        client = default_client_factory()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), fill], "response": hooks.get("response", [])}
        return client

    set_client_factory(factory)
    _TIMEOUTS_INSTALLED = True
