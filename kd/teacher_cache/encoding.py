"""How one token's sparse teacher target is stored: a fixed number of bytes per token.

    arrays = encode(ids, logprobs, log_tail, spec)           # numpy arrays, one row per token
    ids, logprobs, log_tail = decode(arrays, spec)           # torch tensors for the sparse loss

Two encodings (`TopKSpec.encoding`):
- `float32`: the uncompressed reference. ids as uint16 (vocab <= 65,536) or uint32, in rank order,
  log-probs and the log tail mass as float32. 2-4 + 4 bytes per id.
- `packed` (the default): the top-k *set* in Elias-Fano form plus quantised log-probs, ~2.1 bytes per id:
  * ids sorted ascending; the low `l = floor(log2(V / k))` bits of each are bit-packed, the high parts go
    into a unary bit vector of k + (V >> l) + 1 bits (the i-th set bit sits at high_i + i). Near the
    information bound log2 C(V, k); the order of the ids is not needed: the loss works on the set.
  * log-probs (in that id order) as `bits`-bit codes of the gap to the top-1, uniform with a per-token
    step (float16): the gap range / (2^bits - 1). The top-1's own log-prob is not stored: the top-k
    hold 1 - P_tail between them, which fixes it on decoding.
  * the log tail mass as float16.
  At V = 49,152 (SmolLM2), k = 128, bits = 6: 269 bytes/token (DistillKit's compressed format: ~300).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ENCODINGS = ("packed", "float32")


@dataclass(frozen=True)
class TopKSpec:
    """The shape of every stored token: top-k ids out of `vocab` valid ids, and how they are encoded."""

    k: int
    vocab: int
    encoding: str = "packed"
    logprob_bits: int = 6

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if not 0 < self.k <= self.vocab:
            raise ValueError(f"k must be in 1..vocab={self.vocab}, got {self.k}")
        if not 2 <= self.logprob_bits <= 16:
            raise ValueError(f"logprob_bits must be in 2..16, got {self.logprob_bits}")

    @property
    def low_bits(self) -> int:
        return max(0, int(math.floor(math.log2(self.vocab / self.k))))

    @property
    def high_bits(self) -> int:
        return self.k + (self.vocab >> self.low_bits) + 1

    @property
    def id_dtype(self):
        return np.uint16 if self.vocab <= 1 << 16 else np.uint32

    def bytes_per_token(self) -> int:
        """Stored bytes per token (the shard payload; the safetensors header is extra, ~200 bytes a shard)."""
        if self.encoding == "float32":
            return self.k * (np.dtype(self.id_dtype).itemsize + 4) + 4
        return (_nbytes(self.k * self.low_bits) + _nbytes(self.high_bits) + _nbytes(self.k * self.logprob_bits)
                + 2 + 2)

    def describe(self) -> dict:
        d = {"encoding": self.encoding, "k": self.k, "vocab": self.vocab, "bytes_per_token": self.bytes_per_token()}
        if self.encoding == "packed":
            d.update(logprob_bits=self.logprob_bits, id_low_bits=self.low_bits, id_high_bits=self.high_bits,
                     logprobs="uniform codes of the gap to the top-1, per-token float16 step; ids as an "
                     "Elias-Fano set (sorted ascending)", log_tail="float16")
        else:
            d.update(ids=np.dtype(self.id_dtype).name + ", rank order", logprobs="float32", log_tail="float32")
        return d


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


def _pack(values: np.ndarray, width: int) -> np.ndarray:
    """(n, m) unsigned ints < 2^width -> (n, ceil(m*width/8)) uint8, big-endian bit order."""
    n, m = values.shape
    if width == 0 or m == 0:
        return np.zeros((n, 0), np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
    bits = ((values.astype(np.uint32)[:, :, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(n, m * width), axis=1)


def _unpack(packed: np.ndarray, m: int, width: int) -> np.ndarray:
    """Inverse of _pack: (n, bytes) uint8 -> (n, m) int64."""
    n = packed.shape[0]
    if width == 0 or m == 0:
        return np.zeros((n, m), np.int64)
    bits = np.unpackbits(packed, axis=1, count=m * width).reshape(n, m, width)
    return (bits.astype(np.int64) << np.arange(width - 1, -1, -1, dtype=np.int64)).sum(-1)


def encode(ids: torch.Tensor, logprobs: torch.Tensor, log_tail: torch.Tensor, spec: TopKSpec) -> dict[str, np.ndarray]:
    """ids (n, k) int, logprobs (n, k) float (descending or not), log_tail (n,) -> {name: (n, ...) array}."""
    ids_np = ids.cpu().numpy().astype(np.int64)
    lp = logprobs.detach().cpu().float().numpy()
    tail = log_tail.detach().cpu().float().numpy()
    n, k = ids_np.shape
    if k != spec.k:
        raise ValueError(f"expected k={spec.k} ids per token, got {k}")
    if spec.encoding == "float32":
        return {"ids": ids_np.astype(spec.id_dtype), "logprobs": lp.astype(np.float32),
                "log_tail": tail.astype(np.float32)}
    order = np.argsort(ids_np, axis=1, kind="stable")
    sid = np.take_along_axis(ids_np, order, 1)
    slp = np.take_along_axis(lp, order, 1)
    low = sid & ((1 << spec.low_bits) - 1)
    high = sid >> spec.low_bits
    bitvec = np.zeros((n, spec.high_bits), np.uint8)
    np.put_along_axis(bitvec, high + np.arange(k), 1, 1)
    gap = lp.max(1, keepdims=True) - slp
    levels = (1 << spec.logprob_bits) - 1
    # the step is stored as float16: round it up first so that every code still fits in `bits`
    step = np.maximum(gap.max(1) / levels, 1e-6).astype(np.float16)
    step = np.where(step.astype(np.float32) * levels < gap.max(1), np.nextafter(step, np.float16(np.inf)), step)
    codes = np.clip(np.rint(gap / step.astype(np.float32)[:, None]), 0, levels).astype(np.uint32)
    # a float16 tail underflows/overflows outside ~[-65504, 65504]: a dead tail stays a very small number
    tail16 = np.clip(np.nan_to_num(tail, neginf=-60000.0), -60000.0, 0.0).astype(np.float16)
    return {"ids_low": _pack(low, spec.low_bits), "ids_high": np.packbits(bitvec, axis=1),
            "lp_codes": _pack(codes, spec.logprob_bits), "lp_step": step, "log_tail": tail16}


def decode(arrays: dict[str, np.ndarray], spec: TopKSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of stored arrays -> (ids (n, k) int64, log-probs (n, k) float32, log tail (n,) float32).

    Packed log-probs are stored relative to the top-1; they come back absolute, the top-k summing to 1 - P_tail.
    """
    k = spec.k
    if spec.encoding == "float32":
        return (torch.from_numpy(arrays["ids"].astype(np.int64)), torch.from_numpy(arrays["logprobs"].copy()),
                torch.from_numpy(arrays["log_tail"].copy()))
    n = arrays["log_tail"].shape[0]
    bits = np.unpackbits(arrays["ids_high"], axis=1, count=spec.high_bits)
    rows, pos = np.nonzero(bits)
    if pos.shape[0] != n * k:
        raise ValueError(f"corrupt teacher-cache rows: {pos.shape[0]} ids found, expected {n * k}")
    high = pos.reshape(n, k) - np.arange(k)
    ids = (high << spec.low_bits) | _unpack(arrays["ids_low"], k, spec.low_bits)
    codes = _unpack(arrays["lp_codes"], k, spec.logprob_bits).astype(np.float32)
    rel = torch.from_numpy(-codes * arrays["lp_step"].astype(np.float32)[:, None])  # log p - log p_top1
    tail = torch.from_numpy(arrays["log_tail"].astype(np.float32))
    if k == spec.vocab:
        tail = torch.full_like(tail, float("-inf"))
    # absolute log-probs: the top-k hold 1 - P_tail between them, so log p_top1 follows from the tail
    top_mass = torch.log1p(-tail.exp().clamp(max=1 - 1e-7))
    lp = rel - torch.logsumexp(rel, dim=1, keepdim=True) + top_mass[:, None]
    return torch.from_numpy(ids), lp, tail
