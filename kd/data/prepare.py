"""The prepare step: source -> tokenised (in batches, across processes) -> split by document ->
packed -> a memory-mapped prepared set in a content-addressed folder.

    result = prepare_data(cfg.data, student_dir, max_positions=2048)   # -> kd.results.PreparedData
    ps = open_prepared(result.path)                                    # what training and eval read

Tokenising runs as `datasets.map(batched=True, num_proc=data.num_proc)` over Arrow files (nothing
is held in a Python list); its intermediate Arrow files live in a scratch folder that is removed
once the flat files are written. The folder is `<prepared_dir>/<fingerprint>/`, fingerprint =
sha256(source content, tokenizer files, data config, kd/data code): an identical request reuses it.
Documents (not blocks) are split into train/held-out with a fixed seed, so no document is on both
sides. Counts of skipped, truncated, dropped and split records go into the manifest and the result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from kd.build_once import build_once
from kd.data.encode import BLANK, RecordEncoder
from kd.data.prepared import MANIFEST, SPLITS, SplitWriter, open_prepared
from kd.data.sources import (data_fingerprint, detect_format, eos_id, file_dataset, source_files,
                             tokenizer_fingerprint)
from kd.errors import DataError
from kd.results import PreparedData

PREP_FORMAT = 1  # bump when the on-disk layout changes
HELDOUT_SPLIT_SEED = 1234  # fixed: the held-out set must not move when the training seed changes
MAP_BATCH = 1000
SHARD_BYTES = 64 << 20  # input Arrow bytes per map call
TIMINGS: dict[str, float] = {}  # phase -> seconds of the current build (recorded in the manifest)
_REASONS = (("no assistant turn", "no_assistant_turn"), ("is null", "null"), ("is empty", "empty"),
            ("not a string", "not_string"), ("is not one of", "unknown_role"), ("not valid JSON", "invalid_json"),
            ("has no field", "missing_field"), ("no token carries the loss", "no_loss_tokens"))


def prepared_base(cfg) -> Path:
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir).expanduser().resolve()
    return (Path(os.environ.get("KDFLOW_HOME", "~/.cache/kdflow")).expanduser() / "prepared").resolve()


def _code_hash() -> str:
    from kd.hashing import package_hash

    return package_hash(Path(__file__).resolve().parent)


def fingerprint(cfg, tokenizer_dir) -> str:
    """The content address of what `prepare_data(cfg, tokenizer_dir)` would write."""
    from kd.hashing import digest_of

    conf = cfg.model_dump(exclude={"num_proc", "prepared_dir", "revision"})
    return digest_of({"format": str(PREP_FORMAT), "source": data_fingerprint(cfg),
                      "tokenizer": tokenizer_fingerprint(tokenizer_dir), "config": json.dumps(conf, sort_keys=True),
                      "code": _code_hash()})[:32]


def _reason(problem: str) -> str:
    return next((key for text, key in _REASONS if text in problem), "other")


def _where(path: Path, kind: str, line: int) -> str:
    return f"{path}:{line}" if kind in ("txt", "json") else f"{path}: row {line}"


def _tokenise(path: Path, encoder: RecordEncoder, scratch: Path, num_proc: int):
    """Arrow dataset with columns ids, targets, n, line, bad: one row per source record."""
    import datasets
    import pyarrow as pa

    t0 = time.perf_counter()
    ds, kind = file_dataset(path, scratch / "cache")
    TIMINGS["read_s"] = TIMINGS.get("read_s", 0.0) + time.perf_counter() - t0
    first_line = 0 if kind == "row" else 1
    cols = ds.column_names

    def encode(batch, idx, base=0):
        if kind == "row":
            raws = [dict(zip(cols, vals)) for vals in zip(*(batch[c] for c in cols))]
        else:
            raws = batch["raw"]
        ids, targets, lens, bad = encoder.encode_flat(kind, raws)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int32))
        return pa.table({
            "ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "targets": pa.ListArray.from_arrays(offsets, pa.array(targets)),
            "n": pa.array(lens), "line": pa.array(np.asarray(idx, np.int64) + base + first_line),
            "bad": pa.array(bad),
        })

    if kind != "row":
        ds = ds.with_format("python")
    t0 = time.perf_counter()
    # Shards of ~SHARD_BYTES, each mapped by fresh worker processes: a worker only ever maps (and so
    # holds in its RSS) its part of one shard of the memory-mapped input, whatever the corpus size.
    k = max(1, -(-ds.data.nbytes // SHARD_BYTES))
    bounds = np.linspace(0, len(ds), k + 1).astype(int)
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = ds if k == 1 else ds.select(range(a, b))
        procs = num_proc if len(part) >= 2 * MAP_BATCH and num_proc > 1 else None
        parts.append(part.map(
            functools.partial(encode, base=int(a)), batched=True, batch_size=MAP_BATCH, with_indices=True,
            remove_columns=cols, num_proc=procs, desc=None, cache_file_name=str(scratch / f"tok-{path.stem}-{i}.arrow"),
            # our own fingerprint: datasets would otherwise hash (and print) the function's bytecode
            new_fingerprint=hashlib.sha256(f"{scratch.name}|{path}|{i}".encode()).hexdigest()[:32]))
    out = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    TIMINGS["tokenise_s"] = TIMINGS.get("tokenise_s", 0.0) + time.perf_counter() - t0
    return out.with_format("arrow"), kind


def _check_bad(tok, path: Path, kind: str, policy: str, skipped: dict[str, int]) -> int:
    """Raise on the first bad record (policy error) or count them by reason; returns blank lines."""
    import pyarrow.compute as pc

    bad = tok.data.column("bad")
    blank = int(pc.sum(pc.equal(bad, BLANK)).as_py() or 0)
    is_bad = pc.and_(pc.not_equal(bad, ""), pc.not_equal(bad, BLANK))
    if not pc.any(is_bad).as_py():
        return blank
    rows = np.flatnonzero(is_bad.to_numpy(zero_copy_only=False))
    if policy == "error":
        r = int(rows[0])
        line = tok.data.column("line")[r].as_py()
        problem = bad[r].as_py()
        raise DataError(f"{_where(path, kind, line)}: {problem} (data.bad_records=skip skips and counts such records)")
    for problem in bad.take(rows).to_pylist():
        key = _reason(problem)
        skipped[key] = skipped.get(key, 0) + 1
    return blank


def _decode_sample(tok, ids: np.ndarray, tgt: np.ndarray) -> str:
    """Decoded text with the part that carries no loss inside ⟦…⟧."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or tgt[i] != tgt[start]:
            text = tok.decode([int(x) for x in ids[start:i]], skip_special_tokens=False)
            parts.append(text if tgt[start] else f"⟦{text}⟧")
            start = i
    return "".join(parts)


def prepare_data(cfg, tokenizer_dir: str | Path, *, max_positions: int | None = None,
                 min_train_blocks: int = 1) -> PreparedData:
    """Prepare `cfg.data` with the tokenizer in `tokenizer_dir`; reuse an identical prepared set."""
    t0 = time.perf_counter()
    L = cfg.seq_len
    if max_positions is not None and L > max_positions:
        raise DataError(f"data.seq_len={L} is larger than the student's max_position_embeddings={max_positions}")
    files = source_files(cfg)
    fmt = detect_format(cfg, files[0])
    fp = fingerprint(cfg, tokenizer_dir)
    base = prepared_base(cfg)
    root = base / fp
    reused = (root / MANIFEST).is_file()
    if not reused:
        build_once(root, MANIFEST, lambda tmp: _build(cfg, tokenizer_dir, files, fmt, fp, tmp))
    result = _result(root, time.perf_counter() - t0, reused)
    c = result.counts
    if c["train_target_tokens"] == 0 or c["heldout_target_tokens"] == 0:
        which = "training" if c["train_target_tokens"] == 0 else "held-out"
        raise DataError(f"data.source {cfg.source!r}: every label in the {which} split is masked (no token carries "
                        f"the loss; data.train_on={cfg.train_on}, data.format={fmt})")
    if c["train_blocks"] < min_train_blocks:
        raise DataError(
            f"data.source {cfg.source!r}: found {c['tokens']} tokens in {c['documents']} documents, which pack into "
            f"{c['train_blocks']} training blocks of data.seq_len={L}; need at least {min_train_blocks}"
        )
    return result


def _result(root: Path, wall: float, reused: bool) -> PreparedData:
    m = json.loads((root / MANIFEST).read_text())
    return PreparedData(
        path=str(root.resolve()), fingerprint=m["fingerprint"], content_hash=m["content_hash"], format=m["format"],
        seq_len=m["seq_len"], source_files=m["source_files"], tokenizer_sha256=m["tokenizer_sha256"],
        counts=m["counts"], skipped=m["skipped"], length_histogram=m["length_histogram"], samples=m["samples"],
        wall_s=m["wall_s"] if not reused else 0.0, tokens_per_s=m["tokens_per_s"] if not reused else 0.0,
        reused=reused,
    )


def _build(cfg, tokenizer_dir, files: list[Path], fmt: str, fp: str, tmp: Path) -> None:
    t0 = time.perf_counter()
    TIMINGS.clear()
    L = cfg.seq_len
    eos = eos_id(tokenizer_dir)
    encoder = RecordEncoder.for_config(cfg, tokenizer_dir, fmt, eos)
    overlong = cfg.overlong if cfg.overlong != "auto" else ("split" if fmt == "text" else "truncate")
    mode = "single" if not cfg.pack else ("stream" if fmt == "text" and overlong == "split" else "greedy")
    skipped: dict[str, int] = {}
    counts = dict(records=0, blank_lines=0, truncated=0, dropped=0, split=0)
    toks = []
    for f in files:
        tok, kind = _tokenise(f, encoder, tmp, cfg.num_proc)
        counts["blank_lines"] += _check_bad(tok, f, kind, cfg.bad_records, skipped)
        counts["records"] += len(tok)
        toks.append((f, kind, tok))

    # which documents are used (max_tokens: up to the document that reaches it), then the split by document
    budget = cfg.max_tokens
    used = []
    for f, kind, tok in toks:
        n = tok.data.column("n").to_numpy()
        keep = np.flatnonzero(n > 0)
        if budget is not None:
            cum = np.cumsum(n[keep])
            keep = keep[: int(np.searchsorted(cum, budget, side="left")) + 1]
            budget -= int(n[keep].sum())
        used.append(keep)
        if budget is not None and budget <= 0:
            break
    n_docs = sum(len(k) for k in used)
    if n_docs < 2:
        raise DataError(f"data.source {cfg.source!r}: {n_docs} usable document(s); need at least 2 "
                        "(one for training, one held out)")
    n_held = max(1, round(n_docs * cfg.heldout_fraction))
    held = np.zeros(n_docs, bool)
    held[np.random.default_rng(HELDOUT_SPLIT_SEED).permutation(n_docs)[:n_held]] = True

    t_pack = time.perf_counter()
    writers = {s: SplitWriter(tmp / s, L, eos, mode) for s in SPLITS}
    lengths = []
    g = 0
    for fi, ((f, kind, tok), keep) in enumerate(zip(toks, used)):
        for rows, t in _read_rows(tok, keep):
            ids_col, tgt_col = t.column("ids"), t.column("targets")
            offs = ids_col.offsets.to_numpy()
            offs = offs - offs[0]
            ids = ids_col.flatten().to_numpy()
            tgt = tgt_col.flatten().to_numpy()
            lines = t.column("line").to_numpy()
            lens = np.diff(offs)
            lengths.append(lens.copy())
            h = held[g : g + len(rows)]
            g += len(rows)
            if mode == "stream":
                for split, sel in (("train", ~h), ("heldout", h)):
                    _stream(writers[split], ids, tgt, offs[:-1][sel], lens[sel], lines[sel], fi)
                continue
            for j in range(len(rows)):
                d_ids, d_tgt = ids[offs[j] : offs[j] + lens[j]], tgt[offs[j] : offs[j] + lens[j]]
                w = writers["heldout" if h[j] else "train"]
                where = _where(f, kind, int(lines[j]))
                for p_ids, p_tgt in _fit(d_ids, d_tgt, L, overlong, where, counts):
                    if not p_tgt[1:].any():
                        if cfg.bad_records == "error":
                            raise DataError(f"{where}: no token carries the loss after data.overlong={overlong} "
                                            f"(data.train_on={cfg.train_on}; data.bad_records=skip skips such records)")
                        skipped["no_loss_tokens"] = skipped.get("no_loss_tokens", 0) + 1
                        continue
                    w.add_doc(p_ids, p_tgt, fi, int(lines[j]))
    splits = {s: w.finish() for s, w in writers.items()}
    TIMINGS["pack_write_s"] = time.perf_counter() - t_pack
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    counts.update(
        documents=n_docs, tokens=int(lengths.sum()), skipped=sum(skipped.values()),
        target_tokens=sum(s["target_tokens"] for s in splits.values()),
        **{f"{s}_{k}": v[k] for s, v in splits.items() for k in ("blocks", "documents", "tokens", "target_tokens",
                                                                   "padding_tokens")},
    )
    from kd.hashing import digest_of

    content = digest_of({f"{s}/{n}": h for s, v in splits.items() for n, h in v["sha256"].items()})
    wall = time.perf_counter() - t0
    manifest = {
        "prep_format": PREP_FORMAT, "fingerprint": fp, "content_hash": content, "format": fmt, "seq_len": L,
        "mode": mode, "overlong": overlong, "eos_id": eos, "source_files": [str(f) for f in files],
        "tokenizer_dir": str(tokenizer_dir), "tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
        "config": cfg.model_dump(mode="json"), "counts": counts, "skipped": skipped,
        "length_histogram": _histogram(lengths), "splits": splits, "wall_s": wall,
        "tokens_per_s": counts["tokens"] / max(wall, 1e-9), "samples": [], "timings": dict(TIMINGS),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    for p in tmp.glob("tok-*.arrow"):
        p.unlink()
    manifest["samples"] = _samples(tmp, encoder)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _read_rows(tok, keep: np.ndarray):
    """(rows, record batch of those rows) for the sorted row numbers `keep`, in order. The Arrow files
    are read, not memory-mapped: touched pages of a mapping count in the process's RSS, and a
    100 M-token set would otherwise bring ~1 GB of them along."""
    import pyarrow as pa

    r0 = 0
    for cf in tok.cache_files:
        with pa.OSFile(cf["filename"]) as f:
            for rb in pa.ipc.open_stream(f):
                r1 = r0 + rb.num_rows
                lo, hi = np.searchsorted(keep, [r0, r1])
                if hi > lo:
                    rows = keep[lo:hi]
                    yield rows, rb.take(pa.array(rows - r0))
                r0 = r1
                if lo >= len(keep):
                    return


def _stream(w: SplitWriter, ids, tgt, starts, lens, lines, fi: int) -> None:
    if not len(lens):
        return
    total = int(lens.sum())
    idx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(total)
    w.add_stream(ids[idx], tgt[idx], lens, np.column_stack([np.full(len(lens), fi), lines]))


def _fit(ids, tgt, L: int, overlong: str, where: str, counts: dict):
    """The pieces of one document that go into blocks, per data.overlong."""
    if len(ids) <= L:
        return [(ids, tgt)]
    if overlong == "error":
        raise DataError(f"{where}: record has {len(ids)} tokens, more than data.seq_len={L} "
                        "(data.overlong: truncate, drop or split instead of error)")
    if overlong == "drop":
        counts["dropped"] += 1
        return []
    if overlong == "truncate":
        counts["truncated"] += 1
        return [(ids[:L], tgt[:L])]
    counts["split"] += 1
    return [(ids[i : i + L], tgt[i : i + L]) for i in range(0, len(ids), L)]


def _histogram(lengths: np.ndarray) -> dict[str, int]:
    """Document lengths in power-of-two bins: `lo-hi` -> count."""
    if not len(lengths):
        return {}
    bins = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    return {f"{2**b}-{2 ** (b + 1) - 1}": int(c) for b, c in zip(*np.unique(bins, return_counts=True))}


def _samples(root: Path, encoder: RecordEncoder, n: int = 2) -> list[str]:
    ps = open_prepared(root)
    docs = ps.train.docs()
    out = []
    for start, length, _, _ in docs[:n]:
        ids = np.asarray(ps.train.tokens[start : start + min(length, 256)])
        tgt = np.asarray(ps.train.targets[start : start + min(length, 256)])
        out.append(_decode_sample(encoder.tok, ids, tgt))
    return out


def pack_dataset(cfg, tokenizer_dir, *, max_positions: int | None, min_train_blocks: int = 1):
    """Prepare (or reuse) and open: the `PreparedSet` training and eval read."""
    return open_prepared(prepare_data(cfg, tokenizer_dir, max_positions=max_positions,
                                      min_train_blocks=min_train_blocks).path)


def sample_blocks(cfg, tokenizer_dir, n_blocks: int = 4):
    """(n_blocks, seq_len) int64 token ids from the first records (a cheap sample: the vocab check).
    Tokenises only what it needs, without the datasets pipeline."""
    import torch

    from kd.data.sources import file_kind, first_records

    files = source_files(cfg)
    fmt = detect_format(cfg, files[0])
    enc = RecordEncoder.for_config(cfg, tokenizer_dir, fmt, eos_id(tokenizer_dir))
    want = n_blocks * cfg.seq_len
    ids: list[np.ndarray] = []
    got = 0
    for f in files:
        kind = file_kind(f)
        recs = first_records(f, 4 * want)
        out = enc.encode(kind, recs, list(range(1, len(recs) + 1)))
        for a in out["ids"]:
            ids.append(a)
            got += len(a)
            if got >= want:
                break
        if got >= want:
            break
    if got < want:
        raise DataError(f"data.source {cfg.source!r}: found {got} tokens, need at least {want} for a sample of "
                        f"{n_blocks} blocks of data.seq_len={cfg.seq_len}")
    return torch.from_numpy(np.concatenate(ids)[:want].astype(np.int64)).view(n_blocks, cfg.seq_len)
