"""Prompts from prepared data, read off the loss mask (kd/data/prepared.py).

A block holds documents (segments: position ids restart at 0). In one segment, a *turn start* is a
token that carries the loss while the token before it does not (chat: the first token of a trained
assistant turn; prompt_completion: the first completion token). The prompt of that turn is the
segment up to it: for chat data the whole conversation before the trained assistant turn (its
header included, so the model answers as the assistant). Text data has every token trained, so the
prompt is the first `prompt_tokens` tokens of a document. One prompt per row of the batch: among a
row's candidates a seeded draw picks one, so every trained turn gets sampled over an epoch.
"""

from __future__ import annotations

import random

import numpy as np

from kd.data.prepared import IGNORE, Batch


def _segments(pos: np.ndarray) -> list[tuple[int, int]]:
    starts = np.flatnonzero(pos == 0).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [len(pos)]))


def row_candidates(ids: np.ndarray, labels: np.ndarray, pos: np.ndarray, *, fmt: str,
                   prompt_tokens: int) -> list[tuple[int, int]]:
    """(segment start, prompt end) pairs of one row: ids[start:end] is a prompt, ids[end] its first trained token."""
    target = np.zeros(len(ids), bool)
    target[1:] = labels != IGNORE  # token t carries the loss when label t-1 is set
    out = []
    for a, b in _segments(pos):
        if fmt == "text":
            if b - a > prompt_tokens:  # room for at least one completion token
                out.append((a, a + prompt_tokens))
            continue
        for t in range(a + 1, b):
            if target[t] and not target[t - 1]:
                out.append((a, t))
    return out


def prompts_from_batch(batch: Batch, *, fmt: str, prompt_tokens: int, max_prompt_tokens: int,
                       rng: random.Random) -> list[list[int]]:
    """One prompt (token ids) per row of `batch`. Rows with no candidate (a text block of only short
    documents) fall back to the row's first `prompt_tokens` tokens, so the batch keeps its size."""
    ids, labels = batch.ids.numpy(), batch.labels.numpy()
    pos = batch.position_ids.numpy() if batch.position_ids is not None else np.tile(np.arange(ids.shape[1]), (len(ids), 1))
    prompts = []
    for r in range(len(ids)):
        cands = row_candidates(ids[r], labels[r], pos[r], fmt="text" if fmt == "text" else "turns",
                               prompt_tokens=prompt_tokens)
        a, e = cands[rng.randrange(len(cands))] if cands else (0, min(prompt_tokens, ids.shape[1] - 1))
        a = max(a, e - max_prompt_tokens)  # keep the prompt's end: the turn header sits there
        prompts.append(ids[r, a:e].tolist())
    return prompts
