"""Corpora -> tokenised, packed `(blocks, seq_len)` tensors with a deterministic held-out split.

    packed = pack_dataset(cfg.data, tokenizer_dir, max_positions=2048, min_train_blocks=8)
    batch = train_batch(packed.train, step=3, micro=0, batch_size=8, grad_accum=1, seed=0)

Sources (`data.source`): `smoke` (the corpus bundled with kdflow), a local `.txt` (one document
per line), `.jsonl` (`data.text_field` of each record) or `.parquet` file, a folder of those, or
`hf-dataset:owner/name` (the files of a hub dataset repo, fetched like models). Every document
gets EOS appended, then all tokens are packed into `seq_len` blocks.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kd.config import DataConfig
from kd.errors import DataError

SMOKE_CORPUS = Path(__file__).parent / "corpus" / "smoke.txt"
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
HELDOUT_SPLIT_SEED = 1234  # fixed: the held-out set must not move when the training seed changes


@dataclass
class PackedData:
    train: torch.Tensor  # (n_train, seq_len) int64
    heldout: torch.Tensor  # (n_heldout, seq_len) int64
    tokens_read: int
    content_hash: str  # sha256 of the packed tokens: the data part of training's cache key
    source_files: list[str]


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{n}: record has no field {text_field!r} (data.text_field)")
            docs.append(str(record[text_field]))
        return docs
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {table.column_names}")
        return [str(t) for t in table.column(text_field).to_pylist() if t]
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")


def source_files(cfg: DataConfig) -> list[Path]:
    """The files behind `data.source`, in a stable order."""
    if cfg.source == "smoke":
        return [SMOKE_CORPUS]
    if cfg.source.startswith("hf-dataset:"):
        from kd.hub import pull_dataset

        root = Path(pull_dataset(cfg.source.removeprefix("hf-dataset:"), cfg.revision))
    else:
        root = Path(cfg.source).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data.source {cfg.source!r}: no {'/'.join(TEXT_SUFFIXES)} files in {root}")
        return files
    raise DataError(f"data.source {cfg.source!r}: no such file or folder")


def load_tokenizer(tokenizer_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: missing (kdflow tokenises with the student's tokenizer.json)")
    return Tokenizer.from_file(str(path))


def model_max_positions(model_dir: str | Path) -> int | None:
    """`max_position_embeddings` from a model folder's config.json (None when it does not say)."""
    return json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")


def eos_id(tokenizer_dir: str | Path) -> int:
    """The EOS id from config.json / tokenizer_config.json, checked against the tokenizer."""
    d = Path(tokenizer_dir)
    tok = load_tokenizer(d)
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return tok.token_to_id(eos)
    cfg = json.loads((d / "config.json").read_text())
    eid = cfg.get("eos_token_id")
    if isinstance(eid, list):
        eid = eid[0]
    if not isinstance(eid, int):
        raise DataError(f"{d}: no eos token in tokenizer_config.json or eos_token_id in config.json")
    return eid


def pack_dataset(
    cfg: DataConfig, tokenizer_dir: str | Path, *, max_positions: int | None, min_train_blocks: int = 1
) -> PackedData:
    """Tokenise every document (+EOS), pack into `seq_len` blocks, split off the held-out blocks."""
    if max_positions is not None and cfg.seq_len > max_positions:
        raise DataError(
            f"data.seq_len={cfg.seq_len} is larger than the student's max_position_embeddings={max_positions}"
        )
    tok = load_tokenizer(tokenizer_dir)
    eos = eos_id(tokenizer_dir)
    files = source_files(cfg)
    ids: list[int] = []
    for f in files:
        for doc in _read_file(f, cfg.text_field):
            ids.extend(tok.encode(doc).ids)
            ids.append(eos)
            if cfg.max_tokens is not None and len(ids) >= cfg.max_tokens:
                break
        if cfg.max_tokens is not None and len(ids) >= cfg.max_tokens:
            ids = ids[: cfg.max_tokens]
            break

    n_blocks = len(ids) // cfg.seq_len
    n_heldout = max(1, round(n_blocks * cfg.heldout_fraction))
    needed_blocks = min_train_blocks + n_heldout
    if n_blocks < needed_blocks:
        raise DataError(
            f"data.source {cfg.source!r}: found {len(ids)} tokens, need at least "
            f"{needed_blocks * cfg.seq_len} ({min_train_blocks} training + {n_heldout} held-out blocks "
            f"of data.seq_len={cfg.seq_len})"
        )
    blocks = torch.tensor(ids[: n_blocks * cfg.seq_len], dtype=torch.long).view(n_blocks, cfg.seq_len)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(HELDOUT_SPLIT_SEED))
    heldout = blocks[order[:n_heldout]].contiguous()
    train = blocks[order[n_heldout:]].contiguous()
    digest = hashlib.sha256(train.numpy().tobytes() + b"|" + heldout.numpy().tobytes()).hexdigest()
    return PackedData(train, heldout, len(ids), digest, [str(f) for f in files])


def train_batch(
    train: torch.Tensor, *, step: int, micro: int, batch_size: int, grad_accum: int, seed: int
) -> torch.Tensor:
    """The micro-batch for (step, micro): a pure function of its arguments, so a resumed run sees
    exactly the batches the uninterrupted run would have (no loader state to checkpoint).
    Epoch e is a seed-dependent permutation of the blocks; batches walk through it in order."""
    n = train.shape[0]
    start = step * batch_size * grad_accum + micro * batch_size
    rows = [_epoch_order(n, seed, k // n)[k % n] for k in range(start, start + batch_size)]
    return train[torch.stack(rows)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def sample_blocks(cfg: DataConfig, tokenizer_dir: str | Path, n_blocks: int = 4) -> torch.Tensor:
    """The first `n_blocks` packed blocks of the source: a cheap sample batch (e.g. for the vocab check)."""
    want = n_blocks * cfg.seq_len
    small = cfg.model_copy(update={"max_tokens": min(cfg.max_tokens or want, want), "heldout_fraction": 0.5})
    packed = pack_dataset(small, tokenizer_dir, max_positions=None, min_train_blocks=1)
    return torch.cat([packed.train, packed.heldout])


def data_fingerprint(cfg: DataConfig) -> str:
    """sha256 over the source files' content: the data part of training's cache key, without tokenising."""
    from kd.hashing import digest_of, sha256_file

    return digest_of({str(i): sha256_file(f) for i, f in enumerate(source_files(cfg))})
