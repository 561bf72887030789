"""Model (and dataset) sources -> a local folder with a sha256 for every file.

    from kd.hub import pull_model, remote_download_bytes, resolve_commit
    snap = pull_model(cfg.teacher, "teacher")   # ModelSnapshot: local_dir, resolved commit, file hashes
    need = remote_download_bytes(cfg.teacher)   # bytes still to download (None: unknown / not a hub repo)
    sha = resolve_commit(cfg.teacher)           # the 40-hex commit `revision` means now (cache when offline)
    (a hub dataset's files: kd.data.sources.pull_dataset; the fetching and verifying itself: kd.hubclient)

Sources: a hub repo at a revision, a local folder, or `tiny:teacher` / `tiny:student`
(kd.tiny.ensure_tiny, under $KDFLOW_HOME/tiny); a GGUF file, local or `gguf_file` in a hub repo
(converted once to a HF folder by kd.gguf); a student pruned from the teacher (kd.prune). Hub repos go through
`huggingface_hub.snapshot_download` into the standard HF cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
HF_HUB_OFFLINE apply), root-level safetensors, json and tokenizer files only. On top of that:
- a pickle-only repo is refused from its file listing, before anything is downloaded;
- every file is checked against the listing (sha256 for LFS files, git blob sha1 for the others)
  because huggingface_hub does not; a bad blob is evicted and fetched once more, then it fails;
- errors are classified, transient ones retried, and hub requests get finite timeouts
  (kd.hubclient);
- HF_TOKEN (or `token=`) is sent to the hub and never logged, put in messages or returned.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from kd.config import ModelRef
from kd.errors import ModelError
from kd.hashing import hash_tree, sha256_file
from kd.hubclient import (HEX40, Select, Source, cached_commit, classified, expected_file, fetch, hub_token,
                          install_timeouts, resolve_and_list, storage_folder, with_retries)
from kd.evidence.redact import scrub
from kd.results import ModelSnapshot

__all__ = ["pull_model", "remote_download_bytes", "resolve_commit", "select_files", "sha256_file", "hash_tree"]
log = logging.getLogger("kdflow.hub")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")  # configs, tokenizers, chat templates


def select_files(paths: list[str], repo: str, *, trust_remote_code: bool = False) -> list[str]:
    """The root-level files kdflow needs from a model listing; ModelError for pickle-only or no weights.

    Weights: `model*.safetensors` when present (skips duplicate formats such as
    `consolidated.safetensors`), else any root `*.safetensors`. Plus configs, tokenizer files and,
    only with trust_remote_code, the repo's `*.py`.
    """
    root = [p for p in paths if "/" not in p]
    weights = [p for p in root if fnmatchcase(p, "model*.safetensors")] or [
        p for p in root if p.endswith(".safetensors")
    ]
    if not weights:
        pickles = sorted(p for p in root if p.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelError(
                f"{repo}: only pickle weights ({', '.join(pickles[:3])}); kdflow loads safetensors only "
                "(pickle can run code on load). Use a revision or copy of the model with *.safetensors weights."
            )
        raise ModelError(f"{repo}: no *.safetensors weights found")
    if "config.json" not in root:
        raise ModelError(f"{repo}: no config.json, not a transformers model")
    patterns = _SIDE_FILES + (("*.py",) if trust_remote_code else ())
    other = [p for p in root if not p.endswith(".safetensors") and any(fnmatchcase(p, g) for g in patterns)]
    return sorted(weights + other)


# --------------------------------------------------------------------------- public API
def pull_model(
    ref: ModelRef,
    role: Literal["teacher", "student"],
    *,
    cache_dir: str | None = None,
    token: str | None = None,
    teacher: ModelSnapshot | None = None,
    dtype: str = "float32",
    data=None,
) -> ModelSnapshot:
    """Make `ref` available as a local folder and hash it. See the module docstring for the rules.

    `teacher`: the teacher's snapshot, needed when `ref` is a student built from it (`init`).
    `dtype`: what a GGUF source is dequantized to ("float32" | "bfloat16").
    `data`: the run's DataConfig: a student pruned by a measured strategy calibrates on its training split.
    """
    if ref.kind == "pruned":
        if teacher is None:
            raise ModelError(f"{role}: init.from_teacher needs the teacher's snapshot")
        from kd.prune import ensure_pruned

        folder, init = ensure_pruned(teacher, ref.init.from_teacher, data)
        if ref.init.tokenizer is not None:  # cross-tokenizer: the pruned student on another tokenizer
            from kd.cross_tokenizer.student import ensure_transplanted

            folder, info = ensure_transplanted(folder, ref.init.tokenizer)
            init = init.model_copy(update={"tokenizer": info})
        return _snapshot_folder(ref, role, folder, "pruned").model_copy(update={"init": init})
    if ref.is_gguf:
        return _pull_gguf(ref, role, cache_dir, hub_token(token), dtype)
    if ref.kind == "tiny":
        from kd.tiny import ensure_tiny

        teacher_dir, student_dir = ensure_tiny(None)  # $KDFLOW_HOME/tiny, built once
        return _snapshot_folder(ref, role, teacher_dir if ref.repo == "tiny:teacher" else student_dir, "tiny")
    if ref.kind == "local":
        folder = Path(ref.repo).expanduser().resolve()
        if not folder.is_dir():
            raise ModelError(f"{ref.repo}: local model folder not found")
        return _snapshot_folder(ref, role, folder, "local")
    src = Source(ref.repo, ref.revision)
    select = _model_selector(ref)
    commit, folder, files, size = fetch(src, select, cache_dir, hub_token(token))
    return ModelSnapshot(role=role, repo=ref.repo, revision=ref.revision, kind="hub", resolved_commit=commit,
                         local_dir=folder, files=files, total_bytes=size)


def remote_download_bytes(ref: ModelRef, token: str | None = None, *, cache_dir: str | None = None) -> int | None:
    """Bytes `pull_model(ref)` would download now (files already in the cache count 0).

    None for local/tiny models, offline mode, or when the hub cannot be asked (logged, never raised).
    """
    if ref.kind != "hub":
        return None
    from huggingface_hub import constants

    src, token = Source(ref.repo, ref.revision), hub_token(token)
    if constants.is_offline_mode():
        log.info("%s: offline mode (HF_HUB_OFFLINE), download size unknown", src.where)
        return None
    try:
        install_timeouts()
        commit, listing = classified(lambda: resolve_and_list(src, token), src, token)
        wanted = _model_selector(ref)(list(listing))
    except Exception as err:  # sizing is advisory: pull_model reports the real problem
        log.warning("%s: cannot size the download: %s", src.where, scrub(str(err), [token]))
        return None
    snap = Path(storage_folder(src, cache_dir)) / "snapshots" / commit
    return sum(expected_file(listing[p]).size for p in wanted if not (snap / p).is_file())


def resolve_commit(ref: ModelRef, token: str | None = None, *, cache_dir: str | None = None) -> str:
    """The 40-hex commit `ref.revision` names now; offline, the one the HF cache recorded.

    For cache keys: `pull_model` would fetch exactly this commit. Raises ModelError / TransientError.
    """
    from huggingface_hub import HfApi, constants

    src, token = Source(ref.repo, ref.revision), hub_token(token)
    if HEX40.match(ref.revision):
        return ref.revision
    if constants.is_offline_mode():
        return cached_commit(src, cache_dir)
    install_timeouts()
    return with_retries(lambda: HfApi(token=token).model_info(ref.repo, revision=ref.revision).sha, src, token,
                        "resolving the revision")


# --------------------------------------------------------------------------- GGUF files
def _pull_gguf(ref: ModelRef, role: str, cache_dir: str | None, token: str | None, dtype: str) -> ModelSnapshot:
    """A GGUF file (local, or pulled and verified from the hub), converted once to a HF folder (kd.gguf)."""
    from kd.gguf import ensure_hf_folder

    if ref.kind == "local":
        path = Path(ref.repo).expanduser().resolve()
        folder, record = ensure_hf_folder(path, dtype)
        commit = "local"
    else:
        src = Source(ref.repo, ref.revision)
        commit, snap_dir, _, _ = fetch(src, _model_selector(ref), cache_dir, token)
        folder, record = ensure_hf_folder(Path(snap_dir) / str(ref.gguf_file), dtype,
                                          source=f"{ref.repo}@{commit}:{ref.gguf_file}")
    snap = _snapshot_folder(ref, role, folder, "local" if commit == "local" else "hub")
    return snap.model_copy(update={"resolved_commit": commit, "gguf": record})


def _gguf_selector(ref: ModelRef) -> Select:
    def select(paths: list[str]) -> list[str]:
        if ref.gguf_file not in paths:
            found = sorted(p for p in paths if p.lower().endswith(".gguf"))
            raise ModelError(f"{ref.repo}@{ref.revision}: no file {ref.gguf_file!r} (gguf_file); "
                             f"GGUF files in the repo: {', '.join(found[:10]) or 'none'}")
        return [str(ref.gguf_file)]
    return select


# --------------------------------------------------------------------------- local and tiny folders
def _snapshot_folder(ref: ModelRef, role: str, folder: Path, kind: str) -> ModelSnapshot:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    files = hash_tree(folder, include=select_files(names, str(folder), trust_remote_code=ref.trust_remote_code),
                      memo=True)
    return ModelSnapshot(
        role=role, repo=ref.repo, revision=ref.revision, kind=kind, resolved_commit="local",
        local_dir=str(folder), files=files, total_bytes=sum((folder / p).stat().st_size for p in files),
    )


def _model_selector(ref: ModelRef) -> Select:
    if ref.gguf_file is not None:
        return _gguf_selector(ref)
    return lambda paths: select_files(paths, ref.repo, trust_remote_code=ref.trust_remote_code)
