"""What a teacher and a student with different tokenizers can be compared on, per byte-aligned group: KL and
top-1 agreement restated on groups (issue 30 item 5).

    lp_g, top_g = group_outcomes(lp, hit, bounds)     # (G,) log p(group's realized text), (G,) bool
    kl = group_binary_kl(lp_t_g, lp_s_g)              # (G,) KL(teacher || student) of the group event, nats
    ls_e, lt_e = turn_end_logprobs(s_lp, t_lp, end_of_turn_index(eot_s, eot_t))   # (E,) each turn end's event
    agree = top_t_g == top_s_g                        # (G,) bool: group top-1 agreement

Per-token KL and top-1 agreement need one vocabulary. A group (kd/cross_tokenizer/align.py) spans the same bytes on
both sides, so both models give a probability to the same event: "the text continues with this group's realized
bytes". By the chain rule (kd/cross_tokenizer/merge.py) it is p_g = exp(sum of the group's realized token log-probs),
on each side with its own tokens. The definitions (exact, tokenizer-independent):

- **group KL** = mean over groups of the binary KL between the two models' distributions over {realized text,
  anything else}: KL_g = p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s)). It is 0 for a model against
  itself and > 0 whenever the two assign the realized text different probabilities. A student whose tokenizer
  splits the bytes differently is not charged for the split: only the text's probability counts.
- **group top-1 agreement** = share of groups where the two models agree on whether the realized text is their
  top choice: on each side, the merged measure m_g(v) = p_first(v) * (later realized tokens' probability) peaks at
  the realized first token exactly when the model's argmax at the group's first position is that token (the later
  factor does not depend on v). "Top" is that argmax test; agreement compares the two sides' yes/no. It is 1 for a
  model against itself. (Mapping the student's argmax through the exact-match vocabulary was not taken: a token
  with no exact match, or a different split of the same bytes, would count as a disagreement that is not one.)

- **end-of-turn KL** = the same binary KL on each assistant turn end of chat data (kd/cross_tokenizer/chat.py):
  the event "the content ends here and the turn's end-of-turn markup begins", each side through its own tokens
  (the teacher's `<|im_end|>`, the student's own end-of-turn token or first markup token), the chain rule over
  them. The training loss distils it (kd/cross_tokenizer/losses.py); the eval reports its mean.

Computed in float64: log(1 - p) = log(-expm1(log p)); log p is capped at log(1 - 1e-12) so a float32 log-prob that
rounds to 0 (p = 1) gives a finite KL rather than inf (a cap at 1e-12 of probability, below any reported digit).
"""

from __future__ import annotations

import math

import torch

from kd.cross_tokenizer.merge import group_text_logprob

_LOG_ONE = math.log1p(-1e-12)  # the cap on log p: 1 - p >= 1e-12


def group_outcomes(lp: torch.Tensor, hit: torch.Tensor, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) realized log-probs, (N,) bool "argmax == realized token", (G+1,) bounds -> (G,) log p of each group's
    realized text (the chain rule) and (G,) bool: the realized text is the model's top choice (module docstring)."""
    bounds = bounds.long()
    return group_text_logprob(lp.double(), bounds), hit[bounds[:-1]]


def group_binary_kl(lp_teacher: torch.Tensor, lp_student: torch.Tensor) -> torch.Tensor:
    """(G,) log p_t, (G,) log p_s of the same groups' realized text -> (G,) KL(Bern(p_t) || Bern(p_s)) in nats."""
    lt, ls = (x.double().clamp(max=_LOG_ONE) for x in (lp_teacher, lp_student))
    l1t, l1s = torch.log(-torch.expm1(lt)), torch.log(-torch.expm1(ls))
    return lt.exp() * (lt - ls) + (-torch.expm1(lt)) * (l1t - l1s)


def end_of_turn_index(s_ranges: torch.Tensor, t_ranges: torch.Tensor) -> tuple:
    """(E, 2) [start, stop) of each turn end's tokens on each side (blocks.py's BatchPlan.eot_s / eot_t) -> (student
    token indices, their turn end, teacher token indices, their turn end, E)."""
    def flat(r):
        r = r.long().reshape(-1, 2)
        sizes = r[:, 1] - r[:, 0]
        ev = torch.repeat_interleave(torch.arange(len(r), device=r.device), sizes)
        starts = torch.repeat_interleave(r[:, 0] - torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), sizes)
        return starts + torch.arange(int(sizes.sum()), device=r.device), ev

    return (*flat(s_ranges), *flat(t_ranges), int(s_ranges.reshape(-1, 2).shape[0]))


def turn_end_logprobs(s_lp: torch.Tensor, t_lp: torch.Tensor, eot: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Realized log-probs of both sides' tokens (N,), (M,) -> (E,) log p_s, (E,) log p_t of each turn end's event:
    the chain rule over the event's tokens on each side (end_of_turn_index)."""
    s_tok, s_ev, t_tok, t_ev, n = eot
    return (s_lp.new_zeros(n).index_add(0, s_ev, s_lp[s_tok]), t_lp.new_zeros(n).index_add(0, t_ev, t_lp[t_tok]))
