"""Where the data comes from: `data.source` -> files -> Arrow datasets of raw records, and the
student tokenizer's facts (EOS, context length, content hash).

    files = source_files(cfg.data)                 # smoke, a file, a folder or hf-dataset:owner/name
    ds, kind = file_dataset(files[0], cache_dir)   # columns `raw` and `line`; kind: txt | json | row
    fmt = detect_format(cfg.data, files[0])        # text | chat | prompt_completion

.txt files are one document per line (read by `datasets`' own text builder, blank lines kept so the
row index is the line number); .jsonl lines are kept as raw strings and parsed in the tokenising
workers, so a malformed or oddly typed record is reported with its line instead of failing Arrow's
type inference; .parquet/.arrow rows are read as typed records.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd.errors import DataError

SMOKE_CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "smoke.txt"
DATA_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def source_files(cfg) -> list[Path]:
    """The files behind `data.source`, in a stable order."""
    if cfg.source.startswith("hf-dataset:"):
        root = Path(pull_dataset(cfg.source.removeprefix("hf-dataset:"), cfg.revision))
    else:
        from kd.bundled import source_path

        root = source_path(cfg.source)  # smoke / bundled:NAME inside the installed package, else a path
    if root.is_file():
        if root.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{root}: unsupported data file type {root.suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")
        return [root.resolve()]
    if root.is_dir():
        files = sorted(p.resolve() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"data.source {cfg.source!r}: no {'/'.join(DATA_SUFFIXES)} files in {root}")
        return files
    raise DataError(f"data.source {cfg.source!r}: no such file or folder")


def data_fingerprint(cfg) -> str:
    """sha256 over the source files' content (big files through the size/mtime memo)."""
    from kd.hashing import files_digest

    return files_digest(source_files(cfg))


def load_tokenizer(tokenizer_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: missing (kdflow tokenises with the student's tokenizer.json)")
    return Tokenizer.from_file(str(path))


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    from kd.hashing import digest_of, sha256_file

    d = Path(tokenizer_dir)
    return digest_of({n: sha256_file(d / n) for n in TOKENIZER_FILES if (d / n).is_file()})


def model_max_positions(model_dir: str | Path) -> int | None:
    """`max_position_embeddings` from a model folder's config.json (None when it does not say)."""
    p = Path(model_dir) / "config.json"
    return json.loads(p.read_text()).get("max_position_embeddings") if p.is_file() else None


def eos_id(tokenizer_dir: str | Path) -> int:
    """The EOS id from tokenizer_config.json / config.json, checked against the tokenizer."""
    d = Path(tokenizer_dir)
    tok = load_tokenizer(d)
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        eos = json.loads(tc.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return tok.token_to_id(eos)
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    eid = cfg.get("eos_token_id")
    if isinstance(eid, list):
        eid = eid[0]
    if not isinstance(eid, int):
        raise DataError(f"{d}: no eos token in tokenizer_config.json or eos_token_id in config.json")
    return eid


def file_kind(path: Path) -> str:
    return {".txt": "txt", ".jsonl": "json"}.get(path.suffix.lower(), "row")


def file_dataset(path: Path, cache_dir: str | Path):
    """(datasets.Dataset with `raw` (str, or the record's columns) and `line`, kind)."""
    import datasets

    kind = file_kind(path)
    datasets.disable_progress_bars()
    if kind == "txt":
        ds = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(cache_dir))
        return ds.rename_column("text", "raw"), kind
    if kind == "json":  # raw lines: parsed (and checked) by the tokenising workers
        ds = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(cache_dir))
        return ds.rename_column("text", "raw"), kind
    try:
        if path.suffix.lower() == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
        else:
            ds = datasets.Dataset.from_file(str(path))
    except Exception as err:  # pyarrow errors name the problem but not the file
        raise DataError(f"{path}: cannot be read as {path.suffix} ({err})") from None
    return ds, kind


def first_records(path: Path, n: int = 1) -> list:
    """The first `n` non-blank records of a file, for format detection and quick samples."""
    kind = file_kind(path)
    out = []
    if kind in ("txt", "json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(line.rstrip("\n"))
                    if len(out) >= n:
                        break
        return out
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).read_row_group(0).slice(0, n).to_pylist()
    import datasets

    return datasets.Dataset.from_file(str(path)).select(range(n)).to_list()


def detect_format(cfg, path: Path) -> str:
    """data.format, or for auto: chat / prompt_completion / text by the first record."""
    if cfg.format != "auto":
        return cfg.format
    if file_kind(path) == "txt":
        return "text"
    recs = first_records(path, 1)
    if not recs:
        raise DataError(f"{path}: no records")
    rec = recs[0]
    if isinstance(rec, str):
        try:
            rec = json.loads(rec)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:1: not valid JSON ({err.msg})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:1: record is a JSON {type(rec).__name__}, not an object")
    if cfg.messages_field in rec:
        return "chat"
    if cfg.prompt_field in rec and cfg.completion_field in rec:
        return "prompt_completion"
    if cfg.text_field in rec:
        return "text"
    raise DataError(
        f"{path}:1: cannot tell the format (data.format=auto): the record has none of "
        f"{cfg.messages_field!r} (chat), {cfg.prompt_field!r}+{cfg.completion_field!r} (prompt_completion), "
        f"{cfg.text_field!r} (text); its fields: {sorted(rec)}"
    )


def pull_dataset(repo: str, revision: str = "main", *, cache_dir: str | None = None,
                 token: str | None = None) -> str:
    """Local folder with the .txt/.jsonl/.parquet files (any depth) of hub dataset `repo`, verified."""
    from kd.hubclient import Source, fetch, hub_token

    def select(paths: list[str]) -> list[str]:
        wanted = sorted(p for p in paths if p.lower().endswith(DATA_SUFFIXES))
        if not wanted:
            raise DataError(f"hf-dataset:{repo}@{revision}: no {'/'.join(DATA_SUFFIXES)} files in the repo")
        return wanted

    return fetch(Source(repo, revision, "dataset"), select, cache_dir, hub_token(token))[1]
