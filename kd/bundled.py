"""Data that ships inside kdflow (the kd/corpus/ folder of the installed package).

    source_path("bundled:english")                  # .../kd/corpus/english, wherever the command runs
    source_path("bundled:chat/genesis-chat.jsonl")  # a file inside it
    source_path("smoke")                            # .../kd/corpus/smoke.txt (the smoke corpus)
    source_path("data/my.jsonl")                    # anything else: a path, relative to the current folder

Presets name their data `bundled:NAME` instead of `kd/corpus/NAME`: a relative path only resolved when
kdflow ran from the repository root, and not at all from an installed wheel (issue 26).
"""

from __future__ import annotations

from pathlib import Path

from kd.errors import DataError

CORPUS = Path(__file__).resolve().parent / "corpus"
PREFIX = "bundled:"
SMOKE = "smoke"


def bundled_names() -> list[str]:
    """What `bundled:NAME` may name at the top level (folders and files under kd/corpus/)."""
    return sorted(p.name for p in CORPUS.iterdir() if not p.name.startswith((".", "_")))


def source_path(source: str) -> Path:
    """`data.source` as a local path (hub datasets are not local: callers handle `hf-dataset:` first).
    DataError naming data.source for a bundled name that is not there."""
    if source == SMOKE:
        return CORPUS / "smoke.txt"
    if not source.startswith(PREFIX):
        return Path(source).expanduser()
    name = source.removeprefix(PREFIX).strip("/")
    path = (CORPUS / name).resolve()
    # `bundled:../..` must not reach outside the corpus folder
    if not name or not path.is_relative_to(CORPUS) or not path.exists():
        raise DataError(f"data.source {source!r}: no bundled data {name!r}; kdflow ships "
                        f"{', '.join(PREFIX + n for n in bundled_names())}")
    return path


def text_files(source: str) -> list[Path]:
    """The .txt files behind a text source (`bundled:NAME`, a .txt file or a folder of them): what the layer
    choice calibrates on. Empty when the source names nothing readable; callers name their own field."""
    try:
        path = source_path(source)
    except DataError:
        return []
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    return files if files and all(f.is_file() for f in files) else []


def contains(source: str, files: list[Path]) -> bool:
    """Whether any of `files` (resolved) is the file `source` names or lies inside the folder it names: the
    overlap preflight refuses between the reference text and what the run trains or chooses layers on."""
    root = source_path(source).resolve()
    return any(f == root or f.is_relative_to(root) for f in files)
