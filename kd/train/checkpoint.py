"""The single-process loop's checkpoints: `checkpoints/step-NNNNNN/`, a Hugging Face folder plus the
trainer state (optimizer, scheduler, RNG, step, initial loss), saved and loaded without pickle.

    ckpt = save_checkpoint(run_dir, step, model, optimizer, scheduler, student_dir, initial_loss=..., ...)
    ckpt = latest_checkpoint(run_dir)          # the last finished one, or None
    save_trainer_state(ckpt_dir, {"step": 3, "initial_loss": 5.1, "optimizer": opt.state_dict(), ...})
    state = load_trainer_state(ckpt_dir)      # ConfigError naming the file when it is not ours

A checkpoint is written to a temp folder then renamed, so a crash never leaves half of one.

Why not `torch.save`: `torch.load(weights_only=False)` unpickles, and a pickle can run any code;
`train.resume_from` may name any folder. Here tensors go to `trainer_state.safetensors` (a header
plus raw bytes: nothing executes on load) and everything else to `trainer_state.json`, where a
tensor is `{"__tensor__": key}`, a tuple `{"__tuple__": [...]}`, a numpy array
`{"__ndarray__": key, "dtype": ...}` and a dict with non-string keys `{"__items__": [[k, v], ...]}`
(optimizer state is keyed by int). Python floats round-trip exactly through JSON, so a resumed run
ends bit-for-bit equal to an uninterrupted one. A `trainer_state.pt` (older kdflow, or a planted
pickle) is never opened.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kd.errors import ConfigError

if TYPE_CHECKING:
    from kd.rng import RunRNG

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_PICKLE = "trainer_state.pt"
FORMAT = "kdflow-trainer-state/1"
_MARKERS = ("__tensor__", "__tuple__", "__ndarray__", "__items__", "__float__")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def is_checkpoint(folder: Path) -> bool:
    """True when `folder` holds a kdflow trainer state (both files)."""
    return (Path(folder) / STATE_JSON).is_file() and (Path(folder) / STATE_TENSORS).is_file()


def check_resume_dir(folder: str | Path, *, field: str = "train.resume_from") -> str:
    """Preflight's look at a resume folder (files only, nothing loaded): a detail line, or
    ConfigError naming the folder and what is wrong (a pickle there is named and never opened)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is not a folder")
    if not is_checkpoint(folder):
        legacy = folder / LEGACY_PICKLE
        why = (f"it has {legacy.name}, a pickle, which kdflow never loads (it could run code); "
               "resume from a checkpoint written by this kdflow") if legacy.exists() else (
               f"no {STATE_JSON} + {STATE_TENSORS}")
        raise ConfigError(f"{field}: {folder} is not a kdflow checkpoint: {why}")
    return f"{folder}: kdflow checkpoint (trainer state as safetensors + JSON)"


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}  # JSON has no NaN/inf; keep the file standard JSON
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"trainer state at {path}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    """Write `state` (plain values, tensors, numpy arrays, tuples, int-keyed dicts) into `folder`."""
    from safetensors.torch import save_file

    tensors: dict = {}
    plain = _encode(state, tensors, "s")
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    (Path(folder) / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": plain}, allow_nan=False) + "\n")


def load_trainer_state(folder: Path, *, field: str = "train.resume_from") -> dict[str, Any]:
    """The state saved by `save_trainer_state`; ConfigError naming `field` and the file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    check_resume_dir(folder, field=field)
    try:
        doc = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as err:
        raise ConfigError(f"{field}: {folder}: trainer state unreadable: {str(err)[:200]}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{field}: {folder / STATE_JSON}: not a {FORMAT} file")
    try:
        state = _decode(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{field}: {folder / STATE_JSON}: inconsistent with {STATE_TENSORS} ({err!r:.200})") from None
    missing = [k for k in ("step", "initial_loss", "optimizer", "scheduler", "rng") if k not in state]
    if missing:
        raise ConfigError(f"{field}: {folder / STATE_JSON}: lacks {', '.join(missing)}")
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    ckpts = [c for c in ckpts if is_checkpoint(c)]
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    from kd.rng import PROCESS_RNG_LOCK

    with PROCESS_RNG_LOCK:  # as seed_everything
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, student_dir: Path,
                    *, initial_loss: float = float("nan"), config_digest: str = "", run_rng: RunRNG | None = None, tokens: int = 0) -> Path:
    """Atomically write `checkpoints/step-NNNNNN` (HF format + trainer state, no pickle)."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (student_dir / name).is_file():
            shutil.copy2(student_dir / name, tmp / name)
    save_trainer_state(tmp, {"step": step, "initial_loss": initial_loss, "config_digest": config_digest,
                             "tokens": int(tokens),  # trained tokens so far: a resumed run keeps counting
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "rng": {**rng_state(), **({"run": run_rng.state_dict()} if run_rng else {})}})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
