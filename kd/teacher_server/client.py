"""HTTP client of a served teacher: token-id prompts in, top-k log-probs per position out.

    client = TeacherServerClient("http://127.0.0.1:8000", cfg.teacher.server)
    rows = client.prompt_topk([[1, 502, 77], [1, 9]], k=64)   # [(ids (2, 64), logprobs (2, 64)), (ids (1, 64), ...)]
    many = client.map(lambda p: client.prompt_topk(p, 64), batches)   # at most cfg.concurrency in flight
    own = client.sequence_logprobs([[1, 502, 77]])             # [log p(502 | 1), log p(77 | 1 502)]: on-policy scoring

Every request is retried after a connection error, a timeout or HTTP 5xx/429, with exponential backoff
(`retries`, `retry_backoff_s`); then `kd.errors.TransientError` naming the URL (a Prefect task retries it).
Other 4xx are the user's to fix: k above the engine's cap is `ConfigError` naming `--max-logprobs`, an
unknown model `ModelError`; both exit 2. A reply that is not the expected JSON is `ModelError` naming the
field (replies.py). The API key is read from the variable `api_key_env` names and never logged; URLs are
logged without their user:password part.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from kd.errors import ConfigError, ModelError, TransientError
from kd.teacher_server.config import TeacherServerConfig
from kd.teacher_server.replies import prompt_token_logprobs, prompt_topk

RETRY_STATUS = {429, 500, 502, 503, 504}
# vLLM's refusal of a k above its cap: "Requested prompt logprobs of 80, which is greater than max allowed: 64"
_CAP = re.compile(r"(?:max(?:imum)?[ _]?(?:allowed|logprobs)|max_logprobs)[^0-9-]*(-?\d+)", re.I)


def safe_url(url: str) -> str:
    """The URL without user:password (URLs are logged and written into manifests)."""
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if p.port:
        netloc += f":{p.port}"
    return urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


class TeacherServerClient:
    """One engine behind one base URL (`/v1/...`, `/tokenize`, `/health`, `/version` under it)."""

    def __init__(self, url: str, cfg: TeacherServerConfig, *, model: str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.where = safe_url(self.url)
        self.cfg = cfg
        self.model = model or cfg.model_name
        self._sleep = sleep
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"teacher.server.api_key_env: the variable {cfg.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self._http = httpx.Client(base_url=self.url, headers=headers, limits=limits, trust_env=False,
                                  timeout=httpx.Timeout(cfg.request_timeout_s, connect=min(30.0, cfg.request_timeout_s)))
        self._gate = threading.BoundedSemaphore(cfg.concurrency)
        self.requests = 0  # sent, retries included (tests and the bench read it)
        self.retried = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TeacherServerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def request(self, method: str, path: str, body: dict | None = None, *, ok_4xx: bool = False) -> httpx.Response:
        """One call with retries. 2xx -> the response; 4xx -> ModelError/ConfigError (or the response when
        ok_4xx); connection errors, timeouts, 5xx, 429 -> retried, then TransientError naming the URL."""
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.retried += 1
                self._sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            try:
                with self._gate:
                    self.requests += 1
                    r = self._http.request(method, path, json=body)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code} {r.text[:300]!r}"
                continue
            if r.status_code >= 400 and not ok_4xx:
                self._refuse(path, r)
            return r
        raise TransientError(f"teacher server {self.where}{path}: no answer after {self.cfg.retries + 1} tries "
                             f"(last: {last}); is the engine up and reachable from here?")

    def _refuse(self, path: str, r: httpx.Response) -> None:
        text = r.text[:500]
        if r.status_code == 400 and "logprob" in text.lower():
            cap = _CAP.search(text)
            raise ConfigError(f"kd.top_k is above the teacher server's --max-logprobs"
                              f"{f' ({cap.group(1)})' if cap else ''} at {self.where}: start the engine with a "
                              f"larger `--max-logprobs` (teacher.server.max_logprobs with launch) or lower kd.top_k "
                              f"(engine said: {text})")
        raise ModelError(f"teacher server {self.where}{path}: HTTP {r.status_code}: {text}")

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        r = self.request(method, path, body)
        try:
            out = r.json()
        except ValueError:
            raise ModelError(f"teacher server {self.where}{path}: malformed reply, not JSON: {r.text[:200]!r}") from None
        if not isinstance(out, dict):
            raise ModelError(f"teacher server {self.where}{path}: malformed reply, expected a JSON object")
        return out

    def map(self, fn: Callable, items: Iterable) -> list:
        """fn over items with at most `concurrency` requests in flight, results in order."""
        items = list(items)
        if self.cfg.concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ the engine's endpoints
    def health(self) -> bool:
        try:
            return self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def served_models(self) -> list[dict]:
        data = self.json("GET", "/v1/models").get("data")
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise ModelError(f"teacher server {self.where}/v1/models: malformed reply, field `data` is not a list "
                             "of models with an `id`")
        return data

    def version(self) -> str | None:
        r = self.request("GET", "/version", ok_4xx=True)
        try:
            return str(r.json()["version"]) if r.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            return None

    def tokenize(self, text: str) -> list[int]:
        out = self.json("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        toks = out.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            raise ModelError(f"teacher server {self.where}/tokenize: malformed reply, field `tokens` is not a list "
                             "of token ids")
        return toks

    def completions(self, prompts: list[list[int]], k: int) -> list[dict]:
        """POST /v1/completions for token-id prompts: echo, prompt_logprobs k, the least generation vLLM allows
        (max_tokens 1: one sampled token, ignored). Returns the choices in prompt order."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "echo": False, "temperature": 1.0,
                "prompt_logprobs": k, "logprobs": None}
        out = self.json("POST", "/v1/completions", body)
        choices = out.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise ModelError(f"teacher server {self.where}/v1/completions: malformed reply, field `choices` has "
                             f"{len(choices) if isinstance(choices, list) else 'no'} entries for {len(prompts)} prompts")
        try:
            return sorted(choices, key=lambda c: c["index"])
        except (KeyError, TypeError):
            raise ModelError(f"teacher server {self.where}/v1/completions: malformed reply, field "
                             "`choices[].index` missing") from None

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """The teacher's log-prob of each token of each sequence given the ones before it ((n-1,) float64 per
        sequence): what on-policy distillation asks of the teacher about the student's samples."""
        choices = self.completions(sequences, 0)
        return [prompt_token_logprobs(c, p, where=f"{self.where}/v1/completions", field=f"choices[{i}]")
                for i, (c, p) in enumerate(zip(choices, sequences))]

    def prompt_topk(self, prompts: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token-id prompts -> per prompt (ids (n-1, k) int64, log-probs (n-1, k) float64), descending."""
        choices = self.completions(prompts, k)
        return [prompt_topk(c, p, k, where=f"{self.where}/v1/completions", field=f"choices[{i}]")
                for i, (c, p) in enumerate(zip(choices, prompts))]
