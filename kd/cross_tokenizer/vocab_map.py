"""Which student token is which teacher token: exact byte matches, and a sparse student -> teacher projection.

    vmap = exact_matches(pair.teacher_bytes, pair.student_bytes)   # VocabMap: paired ids, share of the teacher's
    proj = build_projection(pair, decay=0.0, max_tokens=4)         # Projection: (Vs -> Vt) sparse weights
    matched_mass(teacher_logprobs, vmap)                           # (n,) teacher probability on matched ids

**Exact matches** (the hybrid loss's matched set, TRL GOLD's `_initialize_vocabulary_mapping`): GOLD pairs
tokens whose *vocabulary strings* are equal, which never pairs a byte-level "Ġthe" with a SentencePiece
"▁the" (TRL needed PR #6388's positional fallback for that). Here tokens pair when the *bytes* they stand for
are equal (token_bytes.py), so " the" is " the" in every family; added tokens (chat markup) pair only with
added tokens of the same content. When one side has several tokens with the same bytes (Phi-3's "!" and
its byte-fallback <0x21>), the ordinary piece pairs first, then by id.

**Projection** (X-Token, NVIDIA 2026; TRL `scripts/xtoken/build_projection_matrix.py`): every student token
is re-tokenized with the teacher, giving a row of weights over teacher ids, so a student distribution
(.., Vs) maps to the teacher's vocabulary as `q @ W` (.., Vt). Rows, in order of preference:
1. the student token's bytes are one teacher token (exact match): weight 1 there;
2. its bytes are text: the teacher's tokenization of that text, checked to spell the same bytes
   (SentencePiece phantom spaces allowed), first `max_tokens` tokens;
3. otherwise (a byte-level piece of a multi-byte character, or a re-tokenization that does not spell the
   bytes): greedy longest-prefix match against the teacher's pieces.
Multi-token rows are weighted 1, decay, decay^2, ... and normalized. X-Token uses decay 0.1 (0.9 * 0.1^i);
the default here is 0: all weight on the first teacher token, because under the chain rule the teacher's
distribution at the group's first position predicts exactly the first teacher token of what follows, and
a student token "Ġhello" realized as teacher "Ġhe" + "llo" is the event "Ġhe" there. X-Token's reverse pass
and fuzzy special-token matching are not taken (every special here has literal bytes to match on).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from kd.cross_tokenizer.token_bytes import TokenBytes


@dataclass(frozen=True)
class VocabMap:
    """teacher_ids[m] and student_ids[m] stand for the same bytes (int64, (M,)); sizes are the vocabularies."""

    teacher_ids: np.ndarray
    student_ids: np.ndarray
    teacher_size: int
    student_size: int

    @property
    def share(self) -> float:
        """Matched share of the teacher's vocabulary (GOLD's adaptive weight for the matched part)."""
        return len(self.teacher_ids) / max(self.teacher_size, 1)

    def as_dict(self) -> dict:
        """What the vocab step reports: matched pairs and their share of each vocabulary."""
        m = len(self.teacher_ids)
        return {"matched": m, "teacher_vocab": self.teacher_size, "student_vocab": self.student_size,
                "teacher_share": self.share, "student_share": m / max(self.student_size, 1)}


def matched_mass(teacher_logprobs: torch.Tensor, vmap: VocabMap) -> torch.Tensor:
    """(n, Vt) teacher log-probs -> (n,) the probability the teacher puts on ids with an exact student match:
    where it is low the hybrid loss leans on ULD (issue 30 item 1 reports its mean on the prepared data)."""
    ids = torch.as_tensor(vmap.teacher_ids, device=teacher_logprobs.device)
    return torch.logsumexp(teacher_logprobs[:, ids], dim=-1).exp()


def _keyed(table: TokenBytes) -> dict[tuple[bool, bytes], list[int]]:
    out: dict[tuple[bool, bytes], list[int]] = defaultdict(list)
    order = sorted(range(len(table)), key=lambda i: (table.fallback[i], i))
    for i in order:
        if table.pieces[i]:
            out[(table.added[i], table.pieces[i])].append(i)
    return out


def exact_matches(teacher: TokenBytes, student: TokenBytes) -> VocabMap:
    """Pairs of ids with equal bytes (and equal added-ness), one-to-one; see the module docstring."""
    t_keys, s_keys = _keyed(teacher), _keyed(student)
    t_ids, s_ids = [], []
    for key, s_list in s_keys.items():
        for t, s in zip(t_keys.get(key, ()), s_list):
            t_ids.append(t)
            s_ids.append(s)
    order = np.argsort(np.asarray(t_ids, dtype=np.int64), kind="stable")
    return VocabMap(np.asarray(t_ids, dtype=np.int64)[order], np.asarray(s_ids, dtype=np.int64)[order],
                    len(teacher), len(student))


@dataclass(frozen=True)
class Projection:
    """Sparse (Vs, Vt) weights as COO: indices (2, nnz) int64 rows = student ids, cols = teacher ids; values
    (nnz,) float64, each non-empty row summing to 1. how: rows by method ('exact', 'retokenized', 'greedy',
    'none'). `matrix(dtype)` gives the transposed (Vt, Vs) torch sparse tensor the loss multiplies with."""

    indices: np.ndarray
    values: np.ndarray
    student_size: int
    teacher_size: int
    how: dict[str, int]

    def matrix_t(self, dtype=torch.float32, device=None) -> torch.Tensor:
        idx = torch.as_tensor(self.indices[::-1].copy(), device=device)
        return torch.sparse_coo_tensor(idx, torch.as_tensor(self.values, dtype=dtype, device=device),
                                       (self.teacher_size, self.student_size), check_invariants=True).coalesce()


def _weights(n: int, decay: float) -> list[float]:
    w = [decay**i for i in range(n)] if decay > 0 else [1.0] + [0.0] * (n - 1)
    total = sum(w)
    return [x / total for x in w]


def _greedy(piece: bytes, lookup: dict[bytes, int], longest: int) -> list[int]:
    out, pos = [], 0
    while pos < len(piece):
        for n in range(min(longest, len(piece) - pos), 0, -1):
            t = lookup.get(piece[pos:pos + n])
            if t is not None:
                out.append(t)
                pos += n
                break
        else:
            return []
    return out


def _spells(teacher: TokenBytes, ids: list[int], piece: bytes) -> bool:
    got = b"".join(teacher.pieces[i] for i in ids)
    return got == piece or (teacher.dummy_prefix and got == b" " + piece)


def build_projection(pair, *, max_tokens: int = 4, decay: float = 0.0) -> Projection:
    """The student -> teacher projection of `pair` (a TokenizerPair); see the module docstring."""
    if max_tokens < 1 or not 0.0 <= decay <= 1.0:
        raise ValueError(f"max_tokens must be >= 1 and decay in [0, 1], got {max_tokens}, {decay}")
    t_tab, s_tab = pair.teacher_bytes, pair.student_bytes
    t_keys = _keyed(t_tab)
    vmap = exact_matches(t_tab, s_tab)
    exact = dict(zip(vmap.student_ids.tolist(), vmap.teacher_ids.tolist()))
    rows: dict[int, list[int]] = {}
    how = {"exact": 0, "retokenized": 0, "greedy": 0, "none": 0}
    todo_ids, todo_text = [], []
    for s, piece in enumerate(s_tab.pieces):
        if s in exact:
            rows[s] = [exact[s]]
            how["exact"] += 1
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            todo_ids.append(s)
            todo_text.append(text)
    if todo_text:
        enc = pair.teacher(todo_text, add_special_tokens=False)["input_ids"]
        for s, ids in zip(todo_ids, enc):
            if ids and _spells(t_tab, ids, s_tab.pieces[s]):
                rows[s] = ids[:max_tokens]
                how["retokenized"] += 1
    lookup = {k[1]: v[0] for k, v in t_keys.items() if not k[0]}
    longest = max((len(k) for k in lookup), default=1)
    for s, piece in enumerate(s_tab.pieces):
        if s in rows:
            continue
        ids = _greedy(piece, lookup, longest) if piece else []
        if ids:
            rows[s] = ids[:max_tokens]
            how["greedy"] += 1
        else:
            how["none"] += 1
    r, c, v = [], [], []
    for s, ids in rows.items():
        acc: dict[int, float] = defaultdict(float)
        for t, w in zip(ids, _weights(len(ids), decay)):
            if w > 0:
                acc[t] += w
        for t, w in acc.items():
            r.append(s)
            c.append(t)
            v.append(w)
    return Projection(np.asarray([r, c], dtype=np.int64).reshape(2, -1), np.asarray(v, dtype=np.float64),
                      len(s_tab), len(t_tab), how)
