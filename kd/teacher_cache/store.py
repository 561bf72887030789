"""The teacher cache on disk: a content-addressed folder of safetensors shards and a manifest.

    folder = cache_folder(root, identity)                  # root/<key>: same inputs, same folder
    reader = TeacherCacheReader(folder, identity)          # refuses a foreign, incomplete or altered cache
    ids, logprobs, log_tail = reader.targets(batch_ids)    # (B*(T-1), k) ... for the sparse KD loss

Layout: `manifest.json` + `<split>-NNNNN.safetensors` (split = train | heldout). Block b of a split has
T-1 stored tokens (position t predicts token t+1), rows b*(T-1) .. (b+1)*(T-1) of the split, and sits
whole in one shard. The manifest says what the cache was built from (teacher content hash, tokenizer
hash, prepared-data fingerprint, sha256 of the token blocks), how it is encoded, what the temperature
means, what the loss makes of it (exact/approximate), and the sha256 of every shard.
Every mismatch is a `kd.errors.DataError` naming the field or the shard (CLI exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kd.errors import DataError
from kd.hashing import sha256_file
from kd.teacher_cache.encoding import TopKSpec, decode

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
# what content-addresses a cache: any change here is another folder
IDENTITY_FIELDS = ("format", "teacher", "tokenizer", "data", "k", "vocab", "rows_kept", "encoding",
                   "logprob_bits", "cache_temperature", "teacher_dtype")


def make_identity(*, teacher: str, tokenizer: str, data: str, spec: TopKSpec, rows_kept: int,
                  cache_temperature: float, teacher_dtype: str = "float32") -> dict:
    """What a cache is a function of. Not α, lr, steps or seed: those reuse the cache."""
    return {"format": FORMAT_VERSION, "teacher": teacher, "tokenizer": tokenizer, "data": data, "k": spec.k,
            "vocab": spec.vocab, "rows_kept": int(rows_kept), "encoding": spec.encoding,
            "logprob_bits": spec.logprob_bits if spec.encoding == "packed" else None,
            "cache_temperature": float(cache_temperature), "teacher_dtype": teacher_dtype}


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def cache_folder(root: str | Path, identity: dict) -> Path:
    return Path(root).expanduser().resolve() / cache_key(identity)


def spec_of(manifest: dict) -> TopKSpec:
    i = manifest["identity"]
    return TopKSpec(k=i["k"], vocab=i["vocab"], encoding=i["encoding"], logprob_bits=i["logprob_bits"] or 6)


def read_blocks(split, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks start..stop of a split: a prepared `kd.data.Split` (ids + position ids that restart per
    document) or a plain (N, T) tensor of ids -> (ids (n, T) int64, position_ids (n, T) int64 or None)."""
    if isinstance(split, torch.Tensor):
        return split[start:stop].to(torch.int64), None
    b = split.batch(np.arange(start, stop))
    return b.ids, b.position_ids


def block_key(ids: np.ndarray, pos: np.ndarray | None) -> bytes:
    """Identifies one block by content: its tokens and (packed documents) its position ids."""
    h = hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    if pos is not None:
        h.update(np.ascontiguousarray(pos, dtype=np.int64).tobytes())
    return h.digest()


def tokens_sha256(split) -> str:
    """Fingerprint of a split's blocks: the prepared set's own file hashes (tokens, targets, positions),
    or sha256 of a tensor's int64 bytes. Ties the cache to the exact prepared tokens."""
    if isinstance(split, torch.Tensor):
        return hashlib.sha256(split.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(split.info["sha256"], sort_keys=True).encode()).hexdigest()


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"teacher cache {path}: unreadable manifest ({err})") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)


def manifest_sha256(folder: str | Path) -> str:
    return sha256_file(Path(folder) / MANIFEST)


def check_identity(folder: Path, manifest: dict, identity: dict) -> None:
    """A cache built from another teacher, tokenizer, data, k, encoding or temperature is never used."""
    have = manifest.get("identity", {})
    for field in IDENTITY_FIELDS:
        if have.get(field) != identity.get(field):
            raise DataError(f"teacher cache {folder} was built for another {field}: {have.get(field)!r}, "
                            f"this run needs {identity.get(field)!r}; it is not used")


def stat_fingerprint(folder: str | Path) -> str:
    """Cheap (no hashing) state of a cache folder for Prefect cache keys: missing, incomplete, or the
    size + mtime of every shard. A deleted or rewritten shard changes it, so the step runs again."""
    folder = Path(folder)
    m = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if m is None or m.get("status") != "complete":
        return "missing" if m is None else "incomplete"
    parts = []
    for split in m["splits"].values():
        for s in split["shards"]:
            p = folder / s["file"]
            parts.append(f"{s['file']}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else f"{s['file']}:-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def bad_shards(folder: Path, manifest: dict) -> list[str]:
    """Shards of a manifest whose file is missing, truncated or altered (sha256), in build order."""
    bad = []
    for split in manifest["splits"].values():
        for s in split["shards"]:
            p = folder / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
                bad.append(s["file"])
    return bad


class TeacherCacheReader:
    """Read-only access to a complete, verified cache: targets for batches of token blocks."""

    def __init__(self, folder: str | Path, identity: dict | None = None, *, verify: bool = True):
        self.folder = Path(folder)
        m = read_manifest(self.folder)
        if m is None:
            raise DataError(f"teacher cache {self.folder}: no {MANIFEST} (never built, or removed)")
        if identity is not None:
            check_identity(self.folder, m, identity)
        if m.get("status") != "complete":
            raise DataError(f"teacher cache {self.folder} is incomplete ({m.get('status')}): run the "
                            "cache_teacher_logits step again, it resumes at the first missing shard")
        if verify:
            bad = bad_shards(self.folder, m)
            if bad:
                names = ", ".join(str(self.folder / b) for b in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                raise DataError(f"teacher cache shard {names}: missing, truncated or altered (sha256 differs from "
                                f"{MANIFEST}): run again, the cache_teacher_logits step rebuilds it")
        self.manifest, self.spec = m, spec_of(m)
        self.cache_temperature = float(m["identity"]["cache_temperature"])
        self._handles: dict[str, object] = {}
        self._index: dict[bytes, tuple[str, int]] = {}

    def bind(self, split: str, blocks) -> None:
        """Declare the blocks a split holds (the trainer's own data: a kd.data.Split or an (N, T) tensor).
        Refuses other data, and lets `targets` find any block by content, whatever order batches come in
        (shuffled, resumed, sharded by rank)."""
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(f"teacher cache {self.folder} has no {split!r} split")
        if tokens_sha256(blocks) != info["tokens_sha256"] or tuple(blocks.shape) != (info["blocks"], info["seq_len"]):
            raise DataError(f"teacher cache {self.folder}: the {split} tokens differ from the ones it was built on "
                            f"({tuple(blocks.shape)} blocks here, {info['blocks']}x{info['seq_len']} there): not used")
        for s in range(0, info["blocks"], 4096):
            ids, pos = read_blocks(blocks, s, min(s + 4096, info["blocks"]))
            for i in range(ids.shape[0]):
                key = block_key(ids[i].numpy(), None if pos is None else pos[i].numpy())
                self._index.setdefault(key, (split, s + i))

    def _shard_rows(self, split: str, block: int) -> dict[str, np.ndarray]:
        info = self.manifest["splits"][split]
        per = info["seq_len"] - 1
        shard = info["shards"][block // info["blocks_per_shard"]]
        f = self._handles.get(shard["file"])
        if f is None:
            f = self._handles[shard["file"]] = safe_open(str(self.folder / shard["file"]), framework="np")
        r0 = (block - shard["first_block"]) * per
        return {name: f.get_slice(name)[r0 : r0 + per] for name in f.keys()}

    def targets(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blocks ids (B, T) [+ position ids] of bound splits -> teacher ids (B*(T-1), k), log-probs, log tail."""
        parts = []
        ids = ids.to(torch.int64).cpu().numpy()
        pos = None if position_ids is None else position_ids.to(torch.int64).cpu().numpy()
        for i, row in enumerate(ids):
            where = self._index.get(block_key(row, None if pos is None else pos[i]))
            if where is None:
                raise DataError(f"teacher cache {self.folder}: a batch block is not in the cache (bind the data first)")
            parts.append(self._shard_rows(*where))
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return decode(arrays, self.spec)
