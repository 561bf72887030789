"""The chain-rule merge of a group's token distributions ("observed", TRL GOLD), chunked over tokens.

    lp = realized_logprobs(hidden, weight, ids, temperature=1.0)      # (N,) log p(token j | prefix), chunked
    later = later_token_sums(lp, bounds)                               # (G,) sum over each group's 2nd.. tokens
    merged = first_logprobs + later[:, None]                           # (g, V) the merged log-measure
    group_text_logprob(lp, bounds)                                     # (G,) log p(the group's realized text)

Convention: `hidden[j]` is the hidden state whose output predicts token `ids[j]` (callers pass a sequence's
hidden states shifted by one, as for any next-token loss). A group holding tokens a..b-1 merges, by the
chain rule, into the measure over the vocabulary
    m_g(v) = p_a(v) * prod_{j=a+1}^{b-1} p_j(ids[j])
(GOLD's "observed" strategy, `_merge_probabilities_with_alignment_groups`: the first position's marginal
distribution times the later realized tokens' probabilities). m_g is not normalized (its mass is the
probability of the group's later tokens); at v = ids[a] it is exactly the probability of the group's realized
text, exp(sum_{j=a}^{b-1} log p_j(ids[j])), which is what a teacher and a student with different tokenizers can
both say about the same bytes. GOLD's alternative "bayesian" strategy (last position's distribution) is not
taken: the first position is the one both sides predict from the same text prefix, since the group starts at
a shared byte boundary.

The per-token realized log-probs are computed chunk by chunk, never holding (N, V) logits: the teacher's
under no_grad through kd.train.losses.iter_logit_chunks, the student's through activation checkpointing (each
chunk's logits are recomputed in backward, so only one chunk of logits is alive at a time). Group sums use
index_add (exact, unlike differences of a running cumsum over thousands of tokens in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kd.train.losses import iter_logit_chunks


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64 (the tests' ground truth), as in kd.train.losses."""
    return torch.promote_types(t.dtype, torch.float32)


def _realized_chunk(h, w, b, y, temperature: float):
    dt = compute_dtype(h)
    z = F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt))
    picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
    return picked / temperature - torch.logsumexp(z / temperature, dim=-1), picked - torch.logsumexp(z, dim=-1)


def realized_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
                      bias: torch.Tensor | None = None, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), ids (N,) -> (log p_T(ids[j]), log p_1(ids[j])), (N,) each.

    p_T = softmax(logits / T). Differentiable w.r.t. hidden/weight/bias when they require grad (checkpointed
    chunks); otherwise computed under no_grad with kd.train.losses.iter_logit_chunks."""
    if hidden.shape[0] != ids.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows, ids {ids.shape[0]}")
    ids = ids.long()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not grad:
        out_t = torch.empty(ids.shape[0], dtype=compute_dtype(hidden), device=hidden.device)
        out_1 = torch.empty_like(out_t)
        for s, z in iter_logit_chunks(hidden, weight, bias, chunk_size=chunk_size):
            y = ids[s:s + z.shape[0]].unsqueeze(1)
            picked = z.gather(1, y).squeeze(1)
            out_1[s:s + z.shape[0]] = picked - torch.logsumexp(z, dim=-1)
            out_t[s:s + z.shape[0]] = picked / temperature - torch.logsumexp(z / temperature, dim=-1)
        return out_t, out_1
    parts_t, parts_1 = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        a, b = checkpoint(_realized_chunk, hidden[s:s + chunk_size], weight, bias, ids[s:s + chunk_size],
                          temperature, use_reentrant=False)
        parts_t.append(a)
        parts_1.append(b)
    if not parts_t:
        empty = hidden.new_zeros(0, dtype=compute_dtype(hidden))
        return empty, empty
    return torch.cat(parts_t), torch.cat(parts_1)


def group_index(bounds: torch.Tensor) -> torch.Tensor:
    """(G+1,) boundaries -> (N,) the group of each token."""
    sizes = (bounds[1:] - bounds[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(sizes), device=bounds.device), sizes)


def later_token_sums(lp: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """(N,) realized log-probs, (G+1,) boundaries -> (G,) sum of log-probs of each group's tokens after its first."""
    bounds = bounds.long()
    later = torch.ones_like(lp, dtype=torch.bool)
    later[bounds[:-1]] = False
    g = group_index(bounds)
    return lp.new_zeros(len(bounds) - 1).index_add(0, g, torch.where(later, lp, torch.zeros_like(lp)))


def group_text_logprob(lp: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """(N,) realized log-probs -> (G,) log-probability of each group's realized text (the chain rule)."""
    return lp.new_zeros(len(bounds) - 1).index_add(0, group_index(bounds.long()), lp)
