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
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

from kd.errors import DataError, InputError, ModelError, TransientError
from kd.redact import scrub

log = logging.getLogger("kdflow.hub")

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
