"""Is a model folder what it claims to be? Checked from config.json, tokenizer files and weight headers.

    raw = read_model_config(d)                 # dict, or ModelError naming config.json and the field
    check_tokenizer(d, "teacher", raw)         # tokenizer.json parses; size fits the output rows
    tensors = inspect_weights(d)               # kd.inspect_weights: headers only
    check_architecture(d, raw, tensors)        # transformers knows the architecture; its weight
                                               # names and shapes match the header (meta device)

Nothing here loads weights: the architecture is instantiated on the `meta` device, which allocates
no memory, to learn which tensors (names, shapes) a real load would need. `check_architecture`
imports transformers and torch; the other checks do not, so a broken file fails fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd.errors import ModelError
from kd.inspect_weights import SHOW, TensorInfo
from kd.model_build_lock import MODEL_BUILD_LOCK

# size fields and the names other architectures give them (gpt2: n_embd, ...)
FIELD_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}
# every causal LM has these (attention heads: not state-space models such as Mamba)
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")
# files transformers can build a tokenizer from when tokenizer.json is absent (sentencepiece, BPE pairs)
OTHER_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "sentencepiece.bpe.model")


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path`; ModelError saying which file and why when it is not one."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: {what} is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise ModelError(f"{path}: {what} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        cut = " (truncated?)" if err.pos >= len(text.rstrip()) - 1 else ""
        raise ModelError(f"{path}: {what} is not valid JSON{cut}: {err.msg} at line {err.lineno} col {err.colno}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def config_field(raw: dict, field: str):
    """A required field by its name or an architecture's alias, at the top or in `text_config`."""
    for scope in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}):
        for name in FIELD_ALIASES.get(field, (field,)):
            if name in scope:
                return scope[name]
    return None


def read_model_config(model_dir: str | Path) -> dict:
    """config.json as a dict with a model_type and positive-integer sizes; ModelError naming the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing (not a model folder)")
    raw = read_json_file(path, "config.json")
    mt = raw.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ModelError(f"{path}: no \"model_type\" (which architecture is this?)")
    for field in FIELD_ALIASES:
        v = config_field(raw, field)
        if v is None and field in REQUIRED_FIELDS:
            raise ModelError(f"{path}: lacks \"{field}\" (every {mt} causal LM needs it)")
        if v is not None and (type(v) is not int or v <= 0):
            raise ModelError(f"{path}: \"{field}\" must be a positive integer, got {v!r}")
    return raw


def check_tokenizer(model_dir: str | Path, role: str, raw_config: dict | None = None) -> int | None:
    """The tokenizer parses; returns its size (max id + 1) when tokenizer.json is there.

    The student needs tokenizer.json (kdflow tokenises the data with it); a teacher may instead
    have sentencepiece/BPE files that transformers converts. No tokenizer at all is named as such,
    not left for the vocab check to misreport as a size difference."""
    d = Path(model_dir)
    path = d / "tokenizer.json"
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        read_json_file(tc, "tokenizer_config.json")
    if not path.is_file():
        if role == "student" or not any((d / f).is_file() for f in OTHER_TOKENIZER_FILES):
            raise ModelError(f"{role} tokenizer missing: {path}")
        return None
    read_json_file(path, "tokenizer.json")  # names a cut or non-UTF-8 file plainly
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust parser's error names the bad part of the structure
        raise ModelError(f"{path}: not a tokenizer the tokenizers library can read: {str(err)[:200]}") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    if size == 0:
        raise ModelError(f"{path}: the tokenizer has no tokens")
    rows = config_field(raw_config or {}, "vocab_size")
    if isinstance(rows, int) and size > rows:
        raise ModelError(f"{path}: {role} tokenizer has {size} token ids but config.json vocab_size is {rows}: "
                         f"ids ≥ {rows} would have no logits")
    return size


def _ignored(key: str, patterns) -> bool:
    import re

    return any(re.search(p, key) for p in patterns or ())


def check_architecture(model_dir: str | Path, raw: dict, tensors: dict[str, TensorInfo] | None,
                       trust_remote_code: bool = False) -> str:
    """transformers knows `model_type` as a causal LM and its weight names/shapes match the header.

    Returns the model class name. Tied-weight aliases (lm_head.weight = embed_tokens.weight) may be
    absent from the file, as a real load allows; any other missing or unexpected name is an error."""
    from transformers import AutoConfig, __version__ as tf_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    d = Path(model_dir)
    path = d / "config.json"
    mt = raw["model_type"]
    if mt not in CONFIG_MAPPING_NAMES:
        if trust_remote_code and raw.get("auto_map"):
            return "remote code (not checked: it would run the repo's code)"
        raise ModelError(f"{path}: model_type {mt!r} is not an architecture transformers {tf_version} knows")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{path}: model_type {mt!r} has no causal-LM model in transformers "
                         f"(architectures: {raw.get('architectures')}); kdflow distils causal LMs")
    import torch

    try:
        cfg = AutoConfig.from_pretrained(d, trust_remote_code=False)
        with MODEL_BUILD_LOCK, torch.device("meta"):  # shapes and names only: no memory, no weights read
            from transformers import AutoModelForCausalLM  # its lazy import is not thread-safe either

            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as err:  # a config transformers rejects, e.g. heads that do not divide hidden_size
        raise ModelError(f"{path}: transformers cannot build a {mt} model from it: "
                         f"{type(err).__name__}: {str(err)[:200]}") from None
    if tensors is None:  # weights in a format inspected elsewhere (GGUF)
        return type(model).__name__
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    present = dict(tensors)
    prefix = model.base_model_prefix
    if prefix and not any(k.startswith(prefix + ".") for k in present):  # a base-model checkpoint
        present = {k if k in expected else f"{prefix}.{k}": v for k, v in present.items()}
    aliases: dict[str, set[str]] = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        aliases.setdefault(target, set()).add(source)
        aliases.setdefault(source, set()).add(target)
    missing = sorted(k for k in expected if k not in present and not (aliases.get(k, set()) & present.keys())
                     and not _ignored(k, model._keys_to_ignore_on_load_missing))
    unexpected = sorted(k for k in present if k not in expected
                        and not _ignored(k, model._keys_to_ignore_on_load_unexpected))
    wrong = [f"{k} {list(present[k].shape)} in {present[k].file} vs {list(expected[k])} from config.json"
             for k in sorted(expected.keys() & present.keys()) if present[k].shape != expected[k]]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:SHOW])}{more}")
    if problems and _renamed_on_load(model):
        # MoE experts fused, multimodal prefixes moved...: names differ by design; the load itself
        # (backends/hf.py) still refuses any weight that is missing or unexpected after conversion
        return f"{type(model).__name__} (names not compared: transformers converts its checkpoint names on load)"
    if problems:
        raise ModelError(f"{d}: the weights do not fit config.json's {type(model).__name__}: " + "; ".join(problems))
    return type(model).__name__


def _renamed_on_load(model) -> bool:
    """Does transformers rename or fuse this architecture's checkpoint tensors when loading it?"""
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
    except ImportError:  # older transformers: checkpoint names are the module names
        return False
    return bool(extract_weight_conversions_for_model(model))
