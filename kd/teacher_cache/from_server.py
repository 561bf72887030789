"""The teacher cache from a served teacher (issue 29): the engine computes the top-k, kdflow stores it.

    summary = build_from_server(cfg, teacher, alignment, folder, identity, spec, splits, run_name)   # step.py

Same shards, encoding and manifest as the in-process build (build.py does the shard bookkeeping, so a
build resumes at the first missing shard after a crash or a killed engine), plus `source` in the manifest:
the engine, its version, the log-prob mode, k and what the temperature means. The engine is reached at
`teacher.server.url` or started for this step (`launch: vllm`) when the first shard must be built, checked
to be the configured teacher (kd/teacher_server/identity.py) before any shard is requested, and stopped
when the build ends or fails; a complete cache is reused without starting anything.

What the engine returns: vLLM's prompt log-probs (`logprobs_mode` raw_logprobs, its default), i.e.
log softmax(logits) at T = 1 over every output row, top-k only. So:
- kd.temperature 1: the top-k are stored as they come, the tail is 1 - sum exp(top-k) (float64);
- kd.temperature T != 1 needs every id (the top-k at T is the same set, but the tail mass at T is unknown from
  the top-k at 1): kd.top_k >= vocab and the engine's --max-logprobs -1; log softmax(logp / T) is exact;
  otherwise the run is refused (ConfigError, exit 2) before the engine starts.
Packed documents: a block is sent as one prompt per document (positions restart, as the in-process
teacher's block-diagonal attention), each carrying the next document's first token so that the engine
also returns the distribution at the document's last position.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from kd.config import RunConfig
from kd.errors import ConfigError, DataError
from kd.results import ModelSnapshot, VocabAlignment
from kd.teacher_cache.build import build_teacher_cache
from kd.teacher_cache.encoding import TopKSpec
from kd.teacher_server.client import TeacherServerClient
from kd.teacher_server.config import TeacherServerConfig
from kd.teacher_server.replies import log_tail_mass

LOGPROB_MODE = "raw_logprobs"
SEMANTICS = ("engine log-probs are log softmax(logits) at T=1 over all output rows (vLLM prompt_logprobs, "
             "logprobs_mode raw_logprobs); stored at kd.temperature: as sent when it is 1, else rescaled exactly "
             "from every id (k = vocab); tail = 1 - sum exp(top-k)")


def teacher_dtype(server: TeacherServerConfig) -> str:
    """The cache identity's `teacher_dtype` for an engine-built cache: never shared with in-process caches."""
    return f"vllm-{server.dtype}"


def request_k(spec: TopKSpec, temperature: float) -> int:
    """The prompt_logprobs to ask for; refuses what the engine's top-k cannot give exactly."""
    if spec.k >= spec.vocab:
        return spec.vocab
    if temperature != 1.0:
        raise ConfigError(f"kd.temperature: {temperature:g} with teacher.server: the engine returns top-k log-probs "
                          f"at T=1 and the tail mass at T={temperature:g} is not known from them; set kd.temperature: 1, "
                          f"or kd.top_k >= the vocabulary ({spec.vocab}) with the engine's --max-logprobs -1")
    return spec.k


def block_prompts(ids: list[int], pos: list[int] | None) -> list[tuple[list[int], int]]:
    """One block (T ids) -> [(prompt, first row)]: one prompt per packed document, each with the next
    document's first token appended; prompt j gives rows first..first+len-2 of the block's T-1 rows."""
    t = len(ids)
    starts = [0] + ([j for j in range(1, t) if pos[j] == 0] if pos is not None else [])
    out = []
    for a, e in zip(starts, starts[1:] + [t]):
        prompt = ids[a: min(e, t - 1) + 1]
        if len(prompt) >= 2:
            out.append((prompt, a))
    return out


def server_targets(client: TeacherServerClient, spec: TopKSpec, *, temperature: float, k: int):
    """targets(ids (B, T), position_ids or None) -> (ids (B*(T-1), spec.k) int64, log-probs float32, log tail (B*(T-1),))."""

    def one_block(args):
        row, pos = args
        plan = block_prompts(row, pos)
        got = client.prompt_topk([p for p, _ in plan], k)
        n = len(row) - 1
        tid = np.full((n, k), -1, np.int64)
        tlp = np.zeros((n, k), np.float64)
        for (prompt, first), (i, lp) in zip(plan, got):
            tid[first: first + len(prompt) - 1], tlp[first: first + len(prompt) - 1] = i, lp
        return tid, tlp

    def targets(ids: torch.Tensor, position_ids: torch.Tensor | None):
        rows = ids.tolist()
        pos = position_ids.tolist() if position_ids is not None else [None] * len(rows)
        parts = client.map(one_block, list(zip(rows, pos)))
        tid = np.concatenate([p[0] for p in parts])
        tlp = np.concatenate([p[1] for p in parts])
        if (tid < 0).any():
            raise DataError(f"teacher server {client.where}: no log-probs for some positions of a block")
        if (tid >= spec.vocab).any():
            raise DataError(f"teacher server {client.where}: the engine's top-{k} holds ids >= the valid vocabulary "
                            f"({spec.vocab}; padding rows kept out of the loss)")
        if k >= spec.vocab:  # every id: exact at any temperature, no tail
            full = np.full((tid.shape[0], spec.vocab), -np.inf)
            np.put_along_axis(full, tid, tlp, 1)
            lp = torch.log_softmax(torch.from_numpy(full) / temperature, dim=1)
            vals, order = lp.topk(spec.k, dim=1)
            return order, vals.float(), torch.full((tid.shape[0],), float("-inf"))
        tail = log_tail_mass(tlp, k=k, vocab=spec.vocab)
        return torch.from_numpy(tid), torch.from_numpy(tlp).float(), torch.from_numpy(tail).float()

    return targets


def teacher_encoder(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def teacher_reference(model_dir: str, trust_remote_code: bool):
    """The configured teacher's own forward for the identity probe: ids -> (n-1, V) log-probs at T=1, fp32."""
    from backends import get_backend

    def forward(ids: list[int]) -> np.ndarray:
        model = get_backend("hf").load(model_dir, device="cpu", trust_remote_code=trust_remote_code).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        return torch.log_softmax(logits, dim=-1).numpy()
    return forward


def build_from_server(cfg: RunConfig, teacher: ModelSnapshot, alignment: VocabAlignment, folder: Path,
                      identity: dict, spec: TopKSpec, splits: dict, run_name: str, *, on_shard=None,
                      log_dir: str | Path | None = None, record: dict | None = None) -> dict:
    """build_teacher_cache with the engine as the teacher. `record` (a dict) receives the engine's launch and
    identity report (the step puts them in its result; tests read them)."""
    from kd.teacher_server.identity import check_served_teacher
    from kd.teacher_server.launch import served_teacher

    server = cfg.teacher.server
    teacher_dir, teacher_repo = teacher.local_dir, teacher.repo
    k = request_k(spec, cfg.kd.temperature)  # refused before anything starts
    seq_len = max((int(tuple(s.shape)[1]) for s in splits.values()), default=0)
    record = {} if record is None else record
    source = {"engine": "vllm", "logprobs_mode": LOGPROB_MODE, "prompt_logprobs": k, "top_k": spec.k,
              "temperature_semantics": SEMANTICS, "dtype": server.dtype}
    log_dir = Path(log_dir or Path(cfg.work_dir) / run_name)
    with ExitStack() as stack:
        def load_teacher():
            t0 = time.perf_counter()
            launch = record.setdefault("launch", {})
            url = stack.enter_context(served_teacher(server, teacher_dir, log_dir=log_dir, record=launch))
            client = stack.enter_context(TeacherServerClient(url, server))
            report = check_served_teacher(
                client, teacher=teacher_repo, vocab=alignment.teacher_rows, k=k, encode=teacher_encoder(teacher_dir),
                reference=teacher_reference(teacher_dir, cfg.teacher.trust_remote_code) if server.identity_probe == "forward"
                else None, tolerance=server.probe_tolerance)
            if report.get("max_model_len") and seq_len > int(report["max_model_len"]):
                raise ConfigError(f"teacher server {client.where}: blocks of {seq_len} tokens exceed the engine's "
                                  f"--max-model-len {report['max_model_len']}")
            record["identity"] = report
            source.update(url=client.where, engine_version=report.get("engine_version"),
                          served_model=report.get("served_model"), launched=bool(launch.get("launched")))
            record["client"] = client
            record["load_s"] = time.perf_counter() - t0  # start-up (launch) + identity: inside the build's wall time
            return server_targets(client, spec, temperature=cfg.kd.temperature, k=k), None

        return build_teacher_cache(folder, identity, spec, load_teacher, splits, temperature=cfg.kd.temperature,
                                   rows_kept=alignment.rows_kept, run_name=run_name, teacher_repo=teacher_repo,
                                   batch_size=cfg.train.batch_size, on_shard=on_shard, source=source)
