"""Is the served model the configured teacher? Checked before any shard is requested.

    report = check_served_teacher(client, teacher="HuggingFaceTB/SmolLM2-135M", vocab=49152, k=64,
                                  encode=tokenizer_encode, reference=forward_logprobs, tolerance=0.05)

Four checks, each a `kd.errors.ConfigError` naming both sides on a mismatch (exit 2):
1. the served model name (`/v1/models`): the configured `served_model_name`, or the engine's only model;
2. the vocabulary: a prompt holding id V-1 is accepted and one holding id V refused (V = the teacher's rows);
3. the tokenizer: `/tokenize` of probe texts equals the configured tokenizer's ids (compared as sha256 of them);
4. a probe's log-probs: the engine's top-k on a short text against `reference(ids)` (the configured teacher's
   own forward, (n-1, V) log-probs at T=1) within `tolerance`; the top-1 must agree where it is not a near tie.
Asking for k also checks the engine's cap: k above `--max-logprobs` is refused, naming the flag (client.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np

from kd.errors import ConfigError, ModelError
from kd.teacher_server.client import TeacherServerClient

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "def mean(xs):\n    return sum(xs) / len(xs)  # 3.14159, 2**10 = 1024",
    "Größe, naïve café — 東京 🚀 \t tabs  and   spaces",
)
NEAR_TIE = 1e-3  # top-1 ids may differ between engines when the two best log-probs are this close


def ids_sha256(ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def check_model_name(client: TeacherServerClient, teacher: str) -> dict:
    models = client.served_models()
    names = [m["id"] for m in models]
    want = client.model
    if want is None:
        if len(names) != 1:
            raise ConfigError(f"teacher.server.served_model_name: the engine at {client.where} serves {names}; name "
                              f"the one that is the teacher {teacher}")
        want = client.model = names[0]
    if want not in names:
        raise ConfigError(f"teacher server {client.where} serves {names}, not {want!r} (teacher {teacher}, "
                          "teacher.server.served_model_name)")
    card = next(m for m in models if m["id"] == want)
    return {"served_model": want, "served_root": card.get("root"), "max_model_len": card.get("max_model_len")}


def check_vocab(client: TeacherServerClient, vocab: int, teacher: str) -> int:
    """The engine accepts id vocab-1 and refuses id vocab: its vocabulary has exactly the teacher's rows."""
    def accepted(tid: int) -> bool:
        body = {"model": client.model, "prompt": [[0, tid]], "max_tokens": 1, "prompt_logprobs": 0}
        r = client.request("POST", "/v1/completions", body, ok_4xx=True)
        return r.status_code < 400
    last_ok, past_ok = accepted(vocab - 1), accepted(vocab)
    if not last_ok or past_ok:
        served = f"fewer than {vocab}" if not last_ok else f"more than {vocab}"
        raise ConfigError(f"teacher server {client.where} ({client.model}) has {served} vocabulary rows; the "
                          f"configured teacher {teacher} has {vocab}: another model is served")
    return vocab


def check_tokenizer(client: TeacherServerClient, encode: Callable[[str], list[int]], teacher: str) -> str:
    local = [list(encode(t)) for t in PROBE_TEXTS]
    served = [client.tokenize(t) for t in PROBE_TEXTS]
    h_local, h_served = ids_sha256(local), ids_sha256(served)
    if h_local != h_served:
        i = next(i for i, (a, b) in enumerate(zip(local, served)) if a != b)
        raise ConfigError(f"teacher server {client.where} ({client.model}) tokenizes differently from the configured "
                          f"teacher {teacher}: probe ids sha256 {h_served[:16]} there, {h_local[:16]} here; probe "
                          f"{PROBE_TEXTS[i][:40]!r}: {served[i][:8]}... vs {local[i][:8]}...")
    return h_local


def check_probe(client: TeacherServerClient, ids: list[int], k: int, reference: Callable[[list[int]], np.ndarray],
                tolerance: float, teacher: str) -> dict:
    """Engine top-k vs the reference log-probs on the same ids: max |Δ| and top-1 agreement."""
    (top_ids, top_lp), = client.prompt_topk([ids], k)
    ref = np.asarray(reference(ids), dtype=np.float64)  # (n-1, V)
    if ref.shape[0] != top_ids.shape[0]:
        raise ModelError(f"identity probe: the reference gave {ref.shape[0]} rows for {top_ids.shape[0]} positions")
    delta = np.abs(np.take_along_axis(ref, top_ids, 1) - top_lp)
    ref_sorted = np.sort(ref, axis=1)
    tie = (ref_sorted[:, -1] - ref_sorted[:, -2]) < NEAR_TIE
    top1 = ref.argmax(1) == top_ids[:, 0]
    worst = float(delta.max())
    report = {"probe_tokens": len(ids), "probe_max_abs_dlogp": worst, "probe_top1_agree": int(top1.sum()),
              "probe_positions": int(top1.size), "tolerance": tolerance}
    if worst > tolerance or not bool((top1 | tie).all()):
        raise ConfigError(f"teacher server {client.where} ({client.model}) is not the configured teacher {teacher}: "
                          f"on a {len(ids)}-token probe max |Δ log p| = {worst:.3g} > teacher.server.probe_tolerance "
                          f"{tolerance:g}, top-1 agrees at {int(top1.sum())}/{top1.size} positions")
    return report


def check_served_teacher(client: TeacherServerClient, *, teacher: str, vocab: int, k: int,
                         encode: Callable[[str], list[int]],
                         reference: Callable[[list[int]], np.ndarray] | None, tolerance: float) -> dict:
    """All four checks (and the k cap); returns what was checked, for the cache manifest and the evidence."""
    report = {"url": client.where, "engine": "vllm", "engine_version": client.version()}
    report.update(check_model_name(client, teacher))
    report["vocab"] = check_vocab(client, vocab, teacher)
    report["tokenizer_probe_sha256"] = check_tokenizer(client, encode, teacher)
    probe = list(encode(PROBE_TEXTS[0]))
    if reference is not None:
        report.update(check_probe(client, probe, k, reference, tolerance, teacher))
    else:  # still ask for k once: a k above the engine's cap is refused here, before any shard
        client.prompt_topk([probe[:4]], k)
        report["probe_max_abs_dlogp"] = None
    return report
