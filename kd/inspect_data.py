"""A cheap look at the training data before anything runs: does it decode, and is there enough of it?

    files = data_files(cfg.data)                                  # [] for hf-dataset: sources (not pulled yet)
    docs = check_data_files(cfg.data, files)                      # DataError naming file and line/row
    check_enough_tokens(cfg, docs, student_tokenizer_json)        # DataError naming the tokens training needs

Read as the data reader will (kd.data): .txt one document per non-blank line, .jsonl one JSON
object per line with the text in `data.text_field`, .parquet rows. Every line must be UTF-8, every
JSON line an object, every text a non-empty string (null, a number or "" trained as the literal
text "None" before). Chat and prompt/completion records are only checked to be JSON objects here;
the data reader checks their fields. Each file is checked up to `CHECK_BYTES` (and a parquet
file up to `8 × CHECK_BYTES`), so preflight stays fast on any corpus; the data step reads it all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

from kd.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
CHECK_BYTES = 64 * 2**20  # per file: lines decoded and records checked up to here
TOTAL_CHECK_BYTES = 4 * CHECK_BYTES  # over all files
SMOKE_CORPUS = Path(__file__).parent / "corpus" / "smoke.txt"
SKIP_HINT = " (data.bad_records=skip skips and counts such records)"


def data_files(data_cfg) -> list[Path]:
    """Local files behind data.source (hub datasets are checked when they are pulled)."""
    if data_cfg.source.startswith("hf-dataset:"):
        return []
    from kd.bundled import source_path

    root = source_path(data_cfg.source)  # smoke / bundled:NAME inside the installed package, else a path
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise DataError(f"data.source {str(root)!r}: unsupported file type {root.suffix!r}; "
                            f"use one of {', '.join(SUFFIXES)}")
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"data.source {data_cfg.source!r}: no {'/'.join(SUFFIXES)} files in {root}")
        return files
    raise DataError(f"data.source {data_cfg.source!r}: no such file or folder")


class Documents(list):
    """The documents preflight read; `complete` is False when a file was only read in part."""

    complete = True


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines in the first CHECK_BYTES; DataError at the first that is not UTF-8."""
    read = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            read += len(raw)
            if read > CHECK_BYTES:
                raise _Partial()
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {err.start} of the line: "
                                f"{raw[err.start:err.start + 4]!r}); re-encode the file as UTF-8") from None


def _text_problem(rec, field: str) -> str | None:
    if not isinstance(rec, dict):
        return f"record is a JSON {type(rec).__name__}, not an object"
    if field not in rec:
        return f"record has no field {field!r} (data.text_field)"
    v = rec[field]
    if v is None:
        return f"{field} is null"
    if not isinstance(v, str):
        return f"{field} is {type(v).__name__}, not a string"
    if not v.strip():
        return f"{field} is empty"
    return None


def _format(data_cfg, first) -> str:
    """data.format, or for auto: chat / prompt_completion / text by the first record (as kd.data does)."""
    fmt = getattr(data_cfg, "format", "text")
    if fmt != "auto" or not isinstance(first, dict):
        return "text" if fmt == "auto" else fmt
    if getattr(data_cfg, "messages_field", "messages") in first:
        return "chat"
    if getattr(data_cfg, "prompt_field", "prompt") in first and getattr(data_cfg, "completion_field", "completion") in first:
        return "prompt_completion"
    return "text"


def _skip_bad(data_cfg) -> bool:
    return getattr(data_cfg, "bad_records", "error") == "skip"  # skipped and counted by the data step


def _jsonl_docs(path: Path, data_cfg) -> Iterator[str | None]:
    field, fmt = data_cfg.text_field, None
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at col {err.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: record is a JSON {type(rec).__name__}, not an object")
        fmt = fmt or _format(data_cfg, rec)
        if fmt != "text":
            yield None  # fields checked by the data reader
            continue
        problem = _text_problem(rec, field)
        if problem and not _skip_bad(data_cfg):
            raise DataError(f"{path}:{n}: {problem}{SKIP_HINT}")
        if not problem:
            yield rec[field]


def _parquet_docs(path: Path, data_cfg) -> Iterator[str | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as err:  # pyarrow's message says what is wrong, not which file
        raise DataError(f"{path}: not a readable parquet file ({str(err)[:160]})") from None
    fmt = _format(data_cfg, dict.fromkeys(names, ""))
    if fmt != "text":
        return
    field = data_cfg.text_field
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (data.text_field); columns: {names}")
    import pyarrow as pa

    ftype = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise DataError(f"{path}: column {field!r} is {ftype}, not a string")
    if path.stat().st_size > 8 * CHECK_BYTES:
        raise _Partial()  # too big to read here: the data step checks every row
    try:
        column = pf.read(columns=[field]).column(field).to_pylist()
    except Exception as err:
        raise DataError(f"{path}: column {field!r} cannot be read ({str(err)[:160]})") from None
    for row, v in enumerate(column):
        if v is None or not v.strip():
            if not _skip_bad(data_cfg):
                raise DataError(f"{path}: row {row}: {field} is {'null' if v is None else 'empty'}{SKIP_HINT}")
            continue
        yield v


def iter_documents(data_cfg, path: Path) -> Iterator[str | None]:
    """The file's documents as the reader will see them (None: a record of a format checked later)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for _, line in _lines(path):
            if line.strip():
                yield line.rstrip("\r\n")
    elif suffix == ".jsonl":
        yield from _jsonl_docs(path, data_cfg)
    elif suffix == ".parquet":
        yield from _parquet_docs(path, data_cfg)
    else:
        yield None  # .arrow: read and checked by the data reader


class _Partial(Exception):
    """Raised by a reader that stops at its byte budget: the rest of the file is the data step's."""


def check_data_files(data_cfg, files: list[Path]) -> Documents:
    """Every file decodes and every record read is usable; returns the documents (for the token count)."""
    docs, budget, kept = Documents(), TOTAL_CHECK_BYTES, 0
    for f in files:
        if budget <= 0:  # a big folder: the first files stand for the rest here
            docs.complete = False
            break
        budget -= min(f.stat().st_size, CHECK_BYTES)
        try:
            for doc in iter_documents(data_cfg, f):
                kept += len(doc or "")
                if kept <= CHECK_BYTES:  # enough to count the tokens any run needs
                    docs.append(doc)
                else:
                    docs.complete = False
        except _Partial:
            docs.complete = False
    if files and not docs and docs.complete:
        raise DataError(f"data.source {data_cfg.source!r}: no documents in {', '.join(str(f) for f in files[:3])}")
    return docs


def tokens_needed(cfg) -> tuple[int, int, str]:
    """(floor, target, why): training needs train.batch_size blocks of data.seq_len tokens from the
    training documents, and data.heldout_fraction of the documents are held out (kd.data splits by
    document). `target` is what a corpus should have; `floor` is the least any split could work with
    (the last training block may be partly padding, one document held out), so a corpus below the
    floor is certainly too small and one above it is left to the data step to judge exactly."""
    b, L, f = cfg.train.batch_size, cfg.data.seq_len, cfg.data.heldout_fraction
    target = math.ceil(b * L / (1 - f))
    floor = (b - 1) * L + 2
    why = (f"train.batch_size={b} training blocks of data.seq_len={L} = {b * L} tokens, plus "
           f"data.heldout_fraction={f:g} of the documents held out")
    return floor, target, why


def check_enough_tokens(cfg, docs: list[str | None], tokenizer_json: Path) -> int | None:
    """Tokens the corpus gives (each document + EOS, as packed), counted only as far as needed;
    DataError naming the number training really needs when there are certainly too few."""
    if not docs or any(d is None for d in docs):
        return None  # chat/prompt-completion: counted when the data is prepared
    from tokenizers import Tokenizer

    floor, target, why = tokens_needed(cfg)
    if cfg.data.max_tokens is not None and cfg.data.max_tokens < floor:
        raise DataError(f"data.max_tokens={cfg.data.max_tokens} is below what training needs: about {target} tokens "
                        f"({why})")
    tok = Tokenizer.from_file(str(tokenizer_json))
    have, batch = 0, 256
    for i in range(0, len(docs), batch):
        have += sum(len(e.ids) + 1 for e in tok.encode_batch(docs[i:i + batch]))
        if have >= target:
            break
    if have < floor and getattr(docs, "complete", True):
        raise DataError(f"data.source {cfg.data.source!r}: {have} tokens in {len(docs)} document(s) (EOS after each "
                        f"included); training needs about {target} ({why})")
    if len(docs) < 2 and getattr(docs, "complete", True):
        raise DataError(f"data.source {cfg.data.source!r}: 1 document; need at least 2 (kdflow holds out whole "
                        "documents for evaluation)")
    return have
