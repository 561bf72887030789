"""Distributed checkpoints: torch.distributed.checkpoint (DCP) for resume, one HF folder for people.

    save(run_dir, step, student, optimizer, state, student_dir, env)   # every rank calls it
    ckpt = latest(run_dir)                                              # or None
    state = load(ckpt, student, optimizer)                              # every rank calls it

A checkpoint is `checkpoints/step-NNNNNN/` holding
  dcp/                      the student's weights and AdamW state, each rank writing its own shards
                            (DCP records every tensor's global shape, so a different world size or
                            a switch between ddp and fsdp loads it: DCP reshards on load)
  distributed_state.json    step, scheduler position, global batch, world size, initial loss
  config.json, model.safetensors, tokenizer files
                            the consolidated student, gathered to and written by rank 0: a plain
                            Hugging Face folder (evaluation and `AutoModelForCausalLM` read it)
It is written under a temporary name and renamed by rank 0 once every rank has finished, so a
crash never leaves half a checkpoint where `latest` would find it.

Trust: DCP's `.metadata` file is a pickle (torch's format). kdflow never unpickles it with the plain
`pickle.load` DCP uses: `SafeReader` admits only DCP's own metadata classes, `torch.Size`, dtypes and
paths, so a planted payload in a `train.resume_from` folder is refused (ConfigError naming the file)
instead of run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from kd.errors import ConfigError

STATE_FILE = "distributed_state.json"
DCP_DIR = "dcp"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / DCP_DIR / ".metadata").is_file()


def latest(run_dir: Path) -> Path | None:
    ckpts = [c for c in sorted((run_dir / "checkpoints").glob("step-*")) if is_checkpoint(c)]
    return ckpts[-1] if ckpts else None


def save(run_dir: Path, step: int, student: torch.nn.Module, optimizer, state: dict, student_dir: Path,
         is_main: bool) -> Path:
    """Collective: every rank writes its DCP shards; rank 0 adds the HF folder and the state file."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(student, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        _drop_tied_output(student, full)
        student.save_pretrained(tmp, state_dict=full, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (student_dir / name).is_file():
                shutil.copy2(student_dir / name, tmp / name)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    del full
    dist.barrier()
    return final


def _drop_tied_output(model: torch.nn.Module, full: dict) -> None:
    """A gathered state dict holds a tied output matrix twice; the HF folder stores it once, as
    single-process training's save_pretrained does."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    out = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is out), None)
    if name is not None:
        full.pop(f"{name}.weight", None)


# What a DCP `.metadata` pickle may name: DCP's own metadata classes and plain torch values
_SAFE_MODULE = "torch.distributed.checkpoint.metadata"  # dataclasses and enums only
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == _SAFE_MODULE and isinstance(obj := super().find_class(module, name), type):
            return obj
        if module == "torch" and isinstance(obj := getattr(torch, name, None), (torch.dtype, torch.layout)):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP metadata file")


class SafeReader(FileSystemReader):
    """DCP's file reader, but the `.metadata` pickle may only name DCP metadata classes (never code)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as err:
            raise ConfigError(f"train.resume_from: {path} is not a DCP metadata file kdflow can read safely: {err}") \
                from None
        if not isinstance(metadata, Metadata):
            raise ConfigError(f"train.resume_from: {path} holds {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def load(ckpt: Path, student: torch.nn.Module, optimizer) -> dict:
    """Collective: load weights + optimizer state into the (wrapped) student, resharding as needed."""
    model_sd, optim_sd = get_state_dict(student, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, storage_reader=SafeReader(str(ckpt / DCP_DIR)))
    set_state_dict(student, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    return read_state(ckpt)
