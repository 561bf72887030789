"""How kdflow talks to the Hugging Face Hub: finite timeouts, error classification, bounded retries.

    from kd.hubclient import Source, with_retries
    src = Source("Qwen/Qwen2.5-0.5B", "main")
    info = with_retries(lambda: HfApi().model_info(src.repo, revision=src.revision), src, token, "resolving")

Permanent failures (missing repo, gated repo, unknown revision, missing file, offline and not
cached, 4xx) become `src.error` (ModelError for models, DataError for datasets) with a message that
says what to do; transient ones (connection errors, timeouts, HTTP 408/429/5xx, which
huggingface_hub 2.x raises as httpx2 transport errors or as LocalEntryNotFoundError caused by one)
are retried with a bounded backoff and end as TransientError. Anything else is a bug and propagates.
Messages never contain the token.

    commit, folder, files, size = fetch(src, select, cache_dir, hub_token(None))   # verified snapshot

`fetch` checks every file against the listing (sha256 for LFS files, git blob sha1 for the others)
because huggingface_hub does not; a bad blob is evicted and fetched once more, then it fails.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, TypeVar

from kd.errors import DataError, InputError, ModelError, TransientError
from kd.evidence.redact import scrub
from kd.hashing import git_blob_sha1, sha256_memo

log = logging.getLogger("kdflow.hub")
HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
Select = Callable[[list[str]], list[str]]  # a repo's file listing -> the files to fetch

# Attempts per hub operation inside one pull (Prefect task retries come on top of these).
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 8.0
# Filled into hub requests that would otherwise wait forever (connect / per read).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """A hub repo at a revision, and the InputError class its failures are reported as."""

    repo: str
    revision: str
    repo_type: Literal["model", "dataset"] = "model"

    @property
    def error(self) -> type[InputError]:
        return ModelError if self.repo_type == "model" else DataError

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.revision}"


def storage_folder(src: Source, cache_dir: str | None) -> str:
    """The repo's folder in the HF cache (blobs/, snapshots/, refs/)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=src.repo, repo_type=src.repo_type))


def offline_error(src: Source, cache_dir: str | None) -> InputError:
    return src.error(
        f"{src.where}: not in the HF cache ({storage_folder(src, cache_dir)}) and the hub cannot be used "
        "(HF_HUB_OFFLINE is set or downloads are disabled). Pull it once online."
    )


class _Transient(Exception):
    """Internal: a failure worth retrying (message already scrubbed)."""


def with_retries(fn: Callable[[], T], src: Source, token: str | None, what: str, attempts: int | None = None) -> T:
    """fn() with transient failures retried (1, 2, 4 … s, capped); permanent ones raised at once."""
    attempts = attempts or RETRY_ATTEMPTS
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, attempts + 1):
        try:
            return classified(fn, src, token)
        except _Transient as err:
            if attempt == attempts:
                raise TransientError(f"{src.where}: {what} failed {attempt} times, last: {err}") from err.__cause__
            log.warning("%s: %s: %s; retry %d/%d in %.1f s", src.where, what, err, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


def classified(fn: Callable[[], T], src: Source, token: str | None) -> T:
    """fn() with hub failures turned into src.error (permanent) or _Transient (retry); others re-raised."""
    try:
        return fn()
    except (InputError, TransientError):
        raise
    except Exception as err:
        problem = classify(err, src, token)
        if isinstance(problem, InputError):
            raise problem from err
        if problem is None:
            raise
        raise _Transient(problem) from err


def classify(err: BaseException, src: Source, token: str | None) -> InputError | str | None:
    """src.error for a permanent failure, a reason string for a transient one, None if not a hub error."""
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

    url = f"{constants.ENDPOINT}/{'datasets/' if src.repo_type == 'dataset' else ''}{src.repo}"
    if find(GatedRepoError):  # a RepositoryNotFoundError subclass: must come first
        return src.error(
            f"{src.repo}: gated repo. Accept its licence at {url} with your account, then set HF_TOKEN to a "
            "read token of that account."
        )
    if find(RevisionNotFoundError):
        return src.error(f"{src.repo}: revision {src.revision!r} not found (no such branch, tag or commit)")
    if find(RepositoryNotFoundError):
        return src.error(
            f"{src.repo}: {src.repo_type} repository not found on {constants.ENDPOINT} "
            "(check the id; if it is private, set HF_TOKEN)"
        )
    if missing := find(RemoteEntryNotFoundError):
        return src.error(f"{src.where}: a listed file is missing on the hub: {scrub(str(missing), [token])[:300]}")
    if find(OfflineModeIsEnabled):
        return offline_error(src, None)
    transport = find(httpx2.TransportError)
    if transport is not None and not isinstance(transport, httpx2.ProxyError):
        return f"{type(transport).__name__}: {scrub(str(transport), [token])[:200]}"
    http = find(HfHubHTTPError)
    status = getattr(getattr(http, "response", None), "status_code", None)
    if http is not None and status is not None:
        if status in (408, 429) or status >= 500:
            return f"HTTP {status}"
        if status in (401, 403):
            return src.error(f"{src.where}: access denied (HTTP {status}); set HF_TOKEN to a token with read access")
        return src.error(f"{src.where}: hub answered HTTP {status}: {scrub(str(http), [token])[:300]}")
    if (c := find((ConnectionError, TimeoutError))) is not None:
        return f"{type(c).__name__}: {scrub(str(c), [token])[:200]}"
    if find(LocalEntryNotFoundError):  # no transient cause in the chain: the cache just lacks it
        return offline_error(src, None)
    return None


_TIMEOUTS_INSTALLED = False


def install_timeouts() -> None:
    """Give huggingface_hub's shared client finite timeouts (its default is timeout=None). Idempotent.

    Process-wide on purpose: transformers' downloads go through the same client.
    """
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
        client = default_client_factory()  # keeps huggingface_hub's own hooks (offline mode, request ids)
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks.get("request", []), fill], "response": hooks.get("response", [])}
        return client

    set_client_factory(factory)
    _TIMEOUTS_INSTALLED = True


# --------------------------------------------------------------------------- fetching a verified snapshot
@dataclass(frozen=True)
class _Expect:
    size: int
    blob_sha1: str | None
    lfs_sha256: str | None


def hub_token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def expected_file(entry) -> _Expect:
    lfs = entry.lfs
    return _Expect(lfs.size if lfs else entry.size, entry.blob_id, lfs.sha256 if lfs else None)


def fetch(src: Source, select: Select, cache_dir: str | None, token: str | None):
    """(commit, snapshot folder, {path: sha256}, total bytes) of the selected files, verified."""
    from huggingface_hub import constants

    install_timeouts()
    if constants.is_offline_mode():
        return _fetch_cached(src, select, cache_dir)
    commit, listing = with_retries(lambda: resolve_and_list(src, token), src, token, "listing files")
    wanted = select(list(listing))  # refuses (e.g. pickle-only) before any download
    expected = {p: expected_file(listing[p]) for p in wanted}

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


def resolve_and_list(src: Source, token: str | None):
    """(40-hex commit, {path: RepoFile}) for the revision, from the hub (datasets: all depths)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(token=token)
    commit = src.revision if HEX40.match(src.revision) else api.repo_info(
        src.repo, repo_type=src.repo_type, revision=src.revision).sha
    if not commit or not HEX40.match(commit):
        raise src.error(f"{src.where}: the hub returned no commit id ({commit!r})")
    entries = api.list_repo_tree(src.repo, repo_type=src.repo_type, revision=commit,
                                 recursive=src.repo_type == "dataset")
    return commit, {e.path: e for e in entries if isinstance(e, RepoFile)}


def cached_commit(src: Source, cache_dir: str | None) -> str:
    ref = Path(storage_folder(src, cache_dir)) / "refs" / src.revision
    if HEX40.match(src.revision):
        return src.revision
    if not ref.is_file():
        raise offline_error(src, cache_dir)
    return ref.read_text().strip()


def _fetch_cached(src: Source, select: Select, cache_dir: str | None):
    """HF_HUB_OFFLINE: the cached snapshot of the revision, complete and matching its blob names."""
    from huggingface_hub import get_cached_repo_tree

    commit = cached_commit(src, cache_dir)
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
        expected[p] = _Expect(listing[p], blob if HEX40.match(blob) else None, blob if _HEX64.match(blob) else None)
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
