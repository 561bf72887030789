"""vLLM's prompt log-probs, read strictly: one completion choice -> top-k ids and log-probs per position.

    ids, logprobs = prompt_topk(choice, prompt, k, where="http://host:8000 choices[0]")   # (n-1, k) each
    log_tail = log_tail_mass(logprobs, k=k, vocab=V)                                      # (n-1,)
    own = prompt_token_logprobs(choice, prompt, where=...)                                # (n-1,) log p(prompt[j] | prompt[:j])

vLLM's `/v1/completions` with `prompt_logprobs: k` answers, per prompt, `prompt_logprobs`: a list as long as
the prompt whose first entry is null (nothing predicts the first token) and whose entry j maps token ids
(JSON strings) to `{"logprob": float, "rank": int, ...}`: the k most likely ids at position j, plus the
prompt's own token j when it is not among them (k + 1 entries then). The log-probs are raw
(`logprobs_mode=raw_logprobs`, vLLM's default): log softmax of the logits over every output row, at
temperature 1, whatever temperature the request carries. A reply that does not have this shape raises
`kd.errors.ModelError` naming the field (exit 2): a cache must never store a half-understood answer.
"""

from __future__ import annotations

import math

import numpy as np

from kd.errors import ModelError


def _bad(where: str, field: str, why: str) -> ModelError:
    return ModelError(f"teacher server {where}: malformed reply, field `{field}` {why}")


def prompt_topk(choice: object, prompt: list[int], k: int, *, where: str, field: str = "choices[0]"
                ) -> tuple[np.ndarray, np.ndarray]:
    """One choice of a completions reply for `prompt` (token ids, n of them) -> (ids (n-1, k) int64,
    log-probs (n-1, k) float64), row j-1 = the distribution that predicts prompt[j], in descending order."""
    if not isinstance(choice, dict):
        raise _bad(where, field, f"is {type(choice).__name__}, expected an object")
    plp = choice.get("prompt_logprobs")
    if not isinstance(plp, list):
        raise _bad(where, f"{field}.prompt_logprobs", "is missing or not a list (does the engine support vLLM's "
                   "prompt_logprobs?)")
    n = len(prompt)
    if len(plp) != n:
        raise _bad(where, f"{field}.prompt_logprobs", f"has {len(plp)} entries, the prompt {n} tokens")
    ids = np.empty((n - 1, k), np.int64)
    lps = np.empty((n - 1, k), np.float64)
    for j in range(1, n):
        entry, f = plp[j], f"{field}.prompt_logprobs[{j}]"
        if not isinstance(entry, dict):
            raise _bad(where, f, f"is {type(entry).__name__}, expected an object of token id -> log-prob")
        got = []
        for key, val in entry.items():
            try:
                tid = int(key)
            except (TypeError, ValueError):
                raise _bad(where, f, f"has key {key!r}, expected a token id") from None
            lp = val.get("logprob") if isinstance(val, dict) else None
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp) or lp > 1e-6:
                raise _bad(where, f"{f}[{key!r}].logprob", f"is {lp!r}, expected a log-probability (a number <= 0)")
            got.append((tid, min(float(lp), 0.0)))
        if len(got) == k + 1:  # the prompt's own token, outside the top-k, comes along: drop it
            own = [i for i, (tid, _) in enumerate(got) if tid == prompt[j]]
            if not own:
                raise _bad(where, f, f"has {k + 1} entries and none is the prompt's token {prompt[j]}")
            got.pop(own[0])
        if len(got) != k:
            raise _bad(where, f, f"has {len(got)} entries, expected the top {k} (+1 for the prompt's own token)")
        got.sort(key=lambda t: (-t[1], t[0]))
        ids[j - 1] = [t for t, _ in got]
        lps[j - 1] = [lp for _, lp in got]
    return ids, lps


def log_tail_mass(logprobs: np.ndarray, *, k: int, vocab: int) -> np.ndarray:
    """log(1 - sum exp(top-k)) per row in float64: the probability on every id outside the top-k. -inf when
    k covers the vocabulary. The engine sends only the top-k, so this is a difference: its absolute error is
    that of the k log-probs (~1e-7 each in float32), i.e. a tiny tail has a large *relative* error."""
    if k >= vocab:
        return np.full(logprobs.shape[0], -np.inf)
    mass = 1.0 - np.exp(logprobs).sum(axis=1)
    return np.log(np.maximum(mass, 1e-30))


def prompt_token_logprobs(choice: object, prompt: list[int], *, where: str, field: str = "choices[0]") -> np.ndarray:
    """log p(prompt[j] | prompt[:j]) for j = 1..n-1, float64: the engine returns the prompt's own token in every
    entry, inside the top-k or not, so this is exact for any k (even 0). On-policy distillation's per-token
    reverse KL estimate on the student's own sample x, log q(x) - log p(x), needs only this from the teacher;
    the full reverse KL needs every id (top-k gives a lower bound, kd.train.losses.SPARSE_EXACTNESS)."""
    if not isinstance(choice, dict) or not isinstance(choice.get("prompt_logprobs"), list):
        raise _bad(where, f"{field}.prompt_logprobs", "is missing or not a list")
    plp = choice["prompt_logprobs"]
    if len(plp) != len(prompt):
        raise _bad(where, f"{field}.prompt_logprobs", f"has {len(plp)} entries, the prompt {len(prompt)} tokens")
    out = np.empty(len(prompt) - 1, np.float64)
    for j in range(1, len(prompt)):
        entry = plp[j] if isinstance(plp[j], dict) else {}
        val = entry.get(str(prompt[j]))
        lp = val.get("logprob") if isinstance(val, dict) else None
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp) or lp > 1e-6:
            raise _bad(where, f"{field}.prompt_logprobs[{j}][{str(prompt[j])!r}].logprob",
                       f"is {lp!r}, expected the prompt token's log-probability")
        out[j - 1] = min(float(lp), 0.0)
    return out
