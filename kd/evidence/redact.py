"""Keep secrets (HF_TOKEN and friends) out of logs, artifacts and the evidence manifest.

    clean = redact(config_dict)                 # values under secret-looking keys -> "***"
    data = scrub(data, secret_values())         # literal secret values cut out of any text/bytes

A key is secret-looking when its name contains `token` (but not `tokenizer`/`tokenise`),
`secret`, `password`/`passwd`, `api_key`/`apikey`, `private_key`, `access_key`, `credential`,
`auth_string`/`authorization` or an `auth` word (`PREFECT_API_AUTH_STRING`, `BASIC_AUTH`), any case.
Credentials inside URLs (`https://user:pw@host`) are cut out of any text by `scrub`, whatever
the variable is called: `scrub_url_credentials("https://u:p@h/x") == "https://***@h/x"`.
Environment variables are recorded by allowlist (`recordable_env`): only names kdflow knows to
be harmless, values still redacted and URL-scrubbed.
Only string values are redacted: numbers and booleans under such keys (`max_tokens: 512`,
`tokens: 1234`) carry no secret and stay readable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"
# Shorter values are not scrubbed from text: `HF_HUB_DISABLE_IMPLICIT_TOKEN=1` must not erase every "1".
MIN_SECRET_LEN = 8

_SECRET_KEY = re.compile(
    r"token(?!i[sz])|secret|passw(?:or)?d|api[_-]?key|private[_-]?key|access[_-]?key|credential"
    r"|auth[_-]?string|authori[sz]ation|(?:^|[_-])auth(?:[_-]|$)", re.I)
# scheme://user:password@host  or  scheme://token@host: everything between :// and @ is a credential
_URL_USERINFO = re.compile(r"(?<=://)[^\s/@'\"<>]+@")
_URL_USERINFO_B = re.compile(rb"(?<=://)[^\s/@'\"<>]+@")
# Environment variables worth recording, by exact name: settings that change what a run does, none secret.
ENV_ALLOWLIST = frozenset({
    "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET",
    "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT", "HF_DATASETS_OFFLINE",
    "HF_DATASETS_CACHE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "TOKENIZERS_PARALLELISM",
    "PREFECT_API_URL", "PREFECT_UI_URL", "PREFECT_HOME", "PREFECT_PROFILE", "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_LEVEL", "DO_NOT_TRACK", "KDFLOW_HOME",
    "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF", "TORCH_HOME", "TORCH_DISTRIBUTED_DEBUG", "NCCL_DEBUG", "NCCL_P2P_DISABLE",
    "NCCL_IB_DISABLE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "WORLD_SIZE", "RANK", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
})


def is_secret_key(name: str) -> bool:
    """True for names like HF_TOKEN, hf_token, access_token, PREFECT_API_KEY, db_password, client_secret."""
    return bool(_SECRET_KEY.search(str(name)))


def shorten(text: str, limit: int = 500) -> str:
    """`text` cut to `limit` characters with an ellipsis and the original length: error messages
    name what is wrong, they never dump a whole config or manifest."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: max(0, limit - 30)]}… [{len(text)} chars, truncated]"


def scrub_url_credentials(text: str | bytes) -> str | bytes:
    """`text` with the `user:password@` (or `token@`) part of every URL replaced by `***@`."""
    if isinstance(text, bytes):
        return _URL_USERINFO_B.sub(REDACTED.encode() + b"@", text)
    return _URL_USERINFO.sub(REDACTED + "@", text)


def recordable_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowlisted environment variables (ENV_ALLOWLIST), sorted, redacted, URL credentials cut.
    Anything else, secret or not, is left out: a name we do not know could hold anything."""
    env = dict(os.environ if env is None else env)
    picked = {k: v for k, v in sorted(env.items()) if k in ENV_ALLOWLIST}
    return {k: (REDACTED if is_secret_key(k) and v else scrub_url_credentials(v)) for k, v in picked.items()}


def redact(obj: Any) -> Any:
    """A copy of dicts/lists with every non-empty string value under a secret-looking key replaced by ***."""
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) and isinstance(v, str) and v else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def _collect(obj: Any, out: set[str]) -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str) and len(v) >= MIN_SECRET_LEN:
                out.add(v)
            else:
                _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def _url_userinfo(obj: Any, out: set[str]) -> None:
    """The credentials of every URL in the (nested) string values: `user:pw`, and `pw` alone."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _url_userinfo(v, out)
    elif isinstance(obj, str):
        for m in _URL_USERINFO.finditer(obj):
            info = m.group(0)[:-1]
            out.update(x for x in (info, info.partition(":")[2]) if len(x) >= MIN_SECRET_LEN)


def secret_values(env: Mapping[str, str] | None = None, *others: Any) -> set[str]:
    """Literal secret values: from `env` (default os.environ) and any nested dicts in `others`,
    including the credentials of URLs found anywhere in them."""
    out: set[str] = set()
    env = dict(os.environ if env is None else env)
    _collect(env, out)
    _url_userinfo(env, out)
    for o in others:
        _collect(o, out)
        _url_userinfo(o, out)
    return out


def scrub(data: str | bytes, secrets: Iterable[str | None]) -> str | bytes:
    """`data` with every occurrence of each secret replaced by ***, and URL credentials cut
    (scrub_url_credentials). Longest first, so a secret that contains another is removed whole."""
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):  # None/"" (no token set) scrub nothing
        if isinstance(data, bytes):
            data = data.replace(s.encode(), REDACTED.encode())
        else:
            data = data.replace(s, REDACTED)
    return scrub_url_credentials(data)
