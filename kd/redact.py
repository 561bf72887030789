"""Keep secrets (HF_TOKEN and friends) out of logs, artifacts and the evidence manifest.

    clean = redact(config_dict)                 # values under secret-looking keys -> "***"
    data = scrub(data, secret_values())         # literal secret values cut out of any text/bytes

A key is secret-looking when its name contains `token` (but not `tokenizer`/`tokenise`),
`secret`, `password`/`passwd`, `api_key`/`apikey`, `private_key` or `credential`, any case.
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

_SECRET_KEY = re.compile(r"token(?!i[sz])|secret|passw(?:or)?d|api[_-]?key|private[_-]?key|credential", re.I)


def is_secret_key(name: str) -> bool:
    """True for names like HF_TOKEN, hf_token, access_token, PREFECT_API_KEY, db_password, client_secret."""
    return bool(_SECRET_KEY.search(str(name)))


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


def secret_values(env: Mapping[str, str] | None = None, *others: Any) -> set[str]:
    """Literal secret values: from `env` (default os.environ) and any nested dicts in `others`."""
    out: set[str] = set()
    _collect(dict(os.environ if env is None else env), out)
    for o in others:
        _collect(o, out)
    return out


def scrub(data: str | bytes, secrets: Iterable[str | None]) -> str | bytes:
    """`data` with every occurrence of each secret replaced by ***. Longest first, so a secret
    that contains another is removed whole."""
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):  # None/"" (no token set) scrub nothing
        if isinstance(data, bytes):
            data = data.replace(s.encode(), REDACTED.encode())
        else:
            data = data.replace(s, REDACTED)
    return data
