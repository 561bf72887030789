"""Read weight-file headers without loading weights: is every file whole and self-consistent?

    tensors = inspect_weights(model_dir)   # {name: TensorInfo} over every weight file, or ModelError

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the data.
Checked per file: the header parses, every dtype is known, shape × dtype size equals the tensor's
byte range, and the byte ranges tile the data exactly (a truncated download leaves a file shorter
than its header promises). A sharded checkpoint's `*.safetensors.index.json` must agree with its
shards. Only the header bytes are read. Other weight formats get their own inspector in
`INSPECTORS` (GGUF: kd.hub / E11), keyed by file suffix.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kd.errors import ModelError

# bits per element of every dtype safetensors defines (sub-byte floats are packed)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"  # transformers' file names
SHOW = 5  # names listed in one message


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


def _names(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} from one .safetensors file; ModelError naming the file and tensor."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ModelError(f"{path}: {size} bytes, too short for a safetensors file (truncated or empty)")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > MAX_HEADER_BYTES:
            raise ModelError(f"{path}: header length {n} bytes is not plausible (not a safetensors file?)")
        if 8 + n > size:
            raise ModelError(f"{path}: truncated: header says {n} bytes of JSON, the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: header is not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: header is not valid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelError(f"{path}: __metadata__ must map strings to strings")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where}: entry must be an object, got {type(entry).__name__}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise ModelError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ModelError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelError(f"{where}: data_offsets must be [begin, end] with 0 ≤ begin ≤ end, got {offsets!r}")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise ModelError(
                f"{where}: dtype {dtype} × shape {shape} = {bits / 8:g} bytes, but data_offsets span "
                f"{offsets[1] - offsets[0]} bytes (wrong dtype or shape in the header)"
            )
        tensors[name] = TensorInfo(path.name, dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            kind = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise ModelError(f"{path}: tensor {name!r} {kind} (data_offsets start at {begin}, expected {end})")
        end = max(end, stop)
    if end > data_bytes:
        raise ModelError(f"{path}: truncated: the header's tensors need {end} bytes of data, the file holds {data_bytes}")
    if end < data_bytes:
        raise ModelError(f"{path}: {data_bytes - end} bytes after the last tensor belong to no tensor (corrupt file)")
    return tensors


def read_index(path: Path) -> dict[str, str]:
    """weight_map of a sharded checkpoint's index.json: {tensor name: shard file name}."""
    try:
        index = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise ModelError(f"{path}: needs a \"weight_map\" object of tensor name -> shard file")
    return wmap


def inspect_safetensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the weight files transformers loads: the shards `model.safetensors.index.json`
    names (which must match them), else `model.safetensors`. Other .safetensors files in the folder
    (e.g. Mistral's consolidated.safetensors) are not loaded, so not inspected."""
    index_path = model_dir / INDEX_NAME
    wmap = read_index(index_path) if index_path.is_file() else None
    if wmap is not None:
        files = [model_dir / s for s in sorted(set(wmap.values()))]
        missing_files = [f.name for f in files if not f.is_file()]
        if missing_files:
            raise ModelError(f"{index_path}: shard files missing: {_names(missing_files)}")
    elif (model_dir / WEIGHTS_NAME).is_file():
        files = [model_dir / WEIGHTS_NAME]
    else:
        found = sorted(p.name for p in model_dir.glob("*.safetensors"))
        raise ModelError(f"{model_dir}: no {WEIGHTS_NAME} or {INDEX_NAME} (what transformers loads); "
                         f".safetensors files there: {', '.join(found[:SHOW]) or 'none'}")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in tensors:
                raise ModelError(f"{model_dir}: tensor {name!r} is in both {tensors[name].file} and {f.name}")
            tensors[name] = info
    if wmap is not None:
        not_in_shard = [n for n, s in wmap.items() if n not in tensors or tensors[n].file != s]
        if not_in_shard:
            raise ModelError(f"{index_path}: tensors listed but not in the shard named: {_names(not_in_shard)}")
        unlisted = [n for n in tensors if n not in wmap]
        if unlisted:
            raise ModelError(f"{index_path}: shards hold tensors the weight_map does not list: {_names(unlisted)}")
    return tensors


# file suffix -> inspector of a model folder; E11 adds ".gguf" (header via the `gguf` package)
INSPECTORS: dict[str, Callable[[Path], dict[str, TensorInfo]]] = {".safetensors": inspect_safetensors}
REFUSED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickle formats: loading them can run code


def inspect_weights(model_dir: str | Path) -> dict[str, TensorInfo] | None:
    """Tensors of the folder's weight files (None when only a format without an inspector is there)."""
    d = Path(model_dir)
    for suffix, inspector in INSPECTORS.items():
        if any(d.glob(f"*{suffix}")):
            return inspector(d)
    if any(d.glob("*.gguf")):
        return None  # GGUF headers are checked where GGUF sources are handled
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in REFUSED) if d.is_dir() else []
    if pickles:
        raise ModelError(f"{d}: no *.safetensors weights, only pickle files ({', '.join(pickles[:SHOW])}), which "
                         "kdflow refuses to load (they can run code)")
    raise ModelError(f"{d}: no weight files (*.safetensors)")
