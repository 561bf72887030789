"""The prepared set on disk: flat memory-mapped token, loss-target and position files per split.

    ps = open_prepared("/home/me/.cache/kdflow/prepared/3f2a.../")   # milliseconds, whatever the size
    batch = train_batch(ps.train, step=3, micro=0, batch_size=8, grad_accum=1, seed=0)
    batch.ids (B, L) int64, batch.labels (B, L-1) int64 (-100 = no loss), batch.position_ids (B, L)

Layout of `<root>/<split>/` (split = train | heldout), block b = elements [b*L, (b+1)*L):
  tokens.bin     uint32  token ids (padding = EOS)
  targets.bin    uint8   1 = this token is predicted from the one before it and carries the loss
  positions.bin  uint16/uint32  position id within its document segment: restarts at 0 at every
                 document (and block) start, so the model's attention is block-diagonal
  docs.bin       int64 (n_docs, 4): start offset, length, source file index, line/row
`<root>/manifest.json` holds the counts, dtypes and sha256 of every file.

Restarting position ids is what keeps packed documents apart: transformers (>= 4.54, masking_utils)
builds a block-diagonal causal mask from position ids that restart, when no attention_mask is
given. tests/test_prepare.py checks a packed conversation's per-token losses equal its losses alone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd.errors import DataError

MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
IGNORE = -100


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L-1) int64: label of position t is ids[t+1], or -100
    position_ids: torch.Tensor  # (B, L) int64
    # where the rows came from (a Split's batch): what is stored per block beside the set is looked up by them.
    # Keyword-only, so that a subclass's own field (objectives.Drawn's kind) can never land here by position.
    rows: np.ndarray | None = field(default=None, kw_only=True)
    split: str | None = field(default=None, kw_only=True)

    def to(self, device) -> "Batch":
        # every other field (rows, split, a subclass's own such as Drawn.kind) goes along unchanged
        return dataclasses.replace(self, ids=self.ids.to(device), labels=self.labels.to(device),
                                   position_ids=self.position_ids.to(device))


class Split:
    """One split of a prepared set: blocks read straight from the memory-mapped files."""

    def __init__(self, root: Path, info: dict, seq_len: int):
        self.root, self.info, self.seq_len = root, info, seq_len
        n = info["blocks"] * seq_len
        self.tokens = np.memmap(root / "tokens.bin", dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
        self.targets = np.memmap(root / "targets.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
        pdt = np.dtype(info["positions_dtype"])
        self.positions = np.memmap(root / "positions.bin", dtype=pdt, mode="r", shape=(n,)) if n else np.zeros(0, pdt)

    def __len__(self) -> int:
        return self.info["blocks"]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def docs(self) -> np.ndarray:
        """(n_docs, 4) int64: start offset, length, source file index, line/row."""
        p = self.root / "docs.bin"
        return np.fromfile(p, dtype=np.int64).reshape(-1, 4) if p.is_file() else np.zeros((0, 4), np.int64)

    def batch(self, rows) -> Batch:
        rows = np.asarray(rows, dtype=np.int64)
        L = self.seq_len
        view = lambda a: a.reshape(-1, L)[rows]  # noqa: E731  (reads only these rows' pages)
        ids = torch.from_numpy(view(self.tokens).astype(np.int64))
        tgt = torch.from_numpy(view(self.targets)[:, 1:].astype(bool))
        pos = torch.from_numpy(view(self.positions).astype(np.int64))
        labels = torch.where(tgt, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
        return Batch(ids, labels, pos, rows=rows, split=self.root.name)


class PreparedSet:
    """An opened prepared set. `train` and `heldout` are `Split`s; `manifest` is the JSON manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mp = self.root / MANIFEST
        if not mp.is_file():
            raise DataError(f"{self.root}: not a prepared data set (no {MANIFEST}); run prepare_data again")
        self.manifest = json.loads(mp.read_text())
        self.seq_len = self.manifest["seq_len"]
        self.train = Split(self.root / "train", self.manifest["splits"]["train"], self.seq_len)
        self.heldout = Split(self.root / "heldout", self.manifest["splits"]["heldout"], self.seq_len)

    # names the old in-memory PackedData had, for callers that still use them
    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def tokens_read(self) -> int:
        return self.manifest["counts"]["tokens"]

    @property
    def source_files(self) -> list[str]:
        return self.manifest["source_files"]


def open_prepared(root: str | Path) -> PreparedSet:
    return PreparedSet(root)


# ---------------------------------------------------------------------------------- batches
def batch_rows(n: int, *, step: int, micro: int, batch_size: int, grad_accum: int, seed: int) -> np.ndarray:
    """Rows of the micro-batch (step, micro): a pure function of its arguments, so a resumed run sees
    exactly the batches the uninterrupted run would have (no loader state to checkpoint).
    Epoch e is a seed-dependent permutation of the blocks; batches walk through it in order."""
    start = step * batch_size * grad_accum + micro * batch_size
    return np.asarray([int(_epoch_order(n, seed, k // n)[k % n]) for k in range(start, start + batch_size)])


def train_batch(train, *, step: int, micro: int, batch_size: int, grad_accum: int, seed: int):
    """The micro-batch for (step, micro): a `Batch` from a `Split`, or rows of a (N, L) tensor."""
    rows = batch_rows(len(train), step=step, micro=micro, batch_size=batch_size, grad_accum=grad_accum, seed=seed)
    if isinstance(train, Split):
        return train.batch(rows)
    return train[torch.from_numpy(rows)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# ---------------------------------------------------------------------------------- writing
class SplitWriter:
    """Appends documents to one split's files. `stream`: documents follow each other and are cut at
    block boundaries (a piece past the boundary starts a new segment); `greedy`: a document never
    crosses a block (the block is padded first); `single`: one document per block."""

    def __init__(self, root: Path, seq_len: int, pad_id: int, mode: str):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.L, self.pad, self.mode = root, seq_len, pad_id, mode
        self.pdt = np.uint16 if seq_len <= np.iinfo(np.uint16).max else np.uint32
        self.files = {n: open(root / f"{n}.bin", "wb") for n in ("tokens", "targets", "positions", "docs")}
        self.hash = {n: hashlib.sha256() for n in self.files}
        self.written = 0  # tokens written (incl. padding)
        self.fill = 0  # tokens in the current (greedy) block
        self.docs = self.doc_tokens = self.targets = self.pad_tokens = 0

    def _write(self, name: str, arr: np.ndarray) -> None:
        b = np.ascontiguousarray(arr).tobytes()
        self.files[name].write(b)
        self.hash[name].update(b)

    def _emit(self, ids, tgt, pos) -> None:
        tgt = tgt & (pos > 0)  # a segment's first token has nothing before it to predict it from
        self._write("tokens", ids.astype(np.uint32, copy=False))
        self._write("targets", tgt.astype(np.uint8, copy=False))
        self._write("positions", pos.astype(self.pdt, copy=False))
        self.written += len(ids)
        self.targets += int(tgt.sum())

    def _pad(self, r: int) -> None:
        if r:
            self._emit(np.full(r, self.pad, np.uint32), np.zeros(r, np.uint8), np.arange(r))
            self.pad_tokens += r

    def add_stream(self, ids: np.ndarray, tgt: np.ndarray, lens: np.ndarray, src: np.ndarray) -> None:
        """Many documents at once (vectorised): ids/tgt flat, lens per document, src (n, 2) file/line."""
        if not len(lens):
            return
        g = self.written
        starts = g + np.concatenate([[0], np.cumsum(lens)[:-1]])
        k = np.arange(g, g + len(ids))
        seg = np.maximum(np.repeat(starts, lens), k - k % self.L)
        self._emit(ids, tgt, k - seg)
        self._write("docs", np.column_stack([starts, lens, src]).astype(np.int64))
        self.docs += len(lens)
        self.doc_tokens += len(ids)

    def add_doc(self, ids: np.ndarray, tgt: np.ndarray, file_idx: int, line: int) -> None:
        n = len(ids)
        if self.fill and (self.mode == "single" or self.fill + n > self.L):
            self._pad(self.L - self.fill)
            self.fill = 0
        self._write("docs", np.asarray([[self.written, n, file_idx, line]], np.int64))
        self._emit(ids, tgt, np.arange(n))
        self.fill = (self.fill + n) % self.L
        self.docs += 1
        self.doc_tokens += n

    def finish(self) -> dict:
        self._pad(-self.written % self.L)
        for f in self.files.values():
            f.close()
        return {"blocks": self.written // self.L, "documents": self.docs, "tokens": self.doc_tokens,
                "target_tokens": self.targets, "padding_tokens": self.pad_tokens,
                "positions_dtype": np.dtype(self.pdt).name,
                "sha256": {f"{n}.bin": h.hexdigest() for n, h in self.hash.items()}}
