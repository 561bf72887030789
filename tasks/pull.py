"""Task `pull_models`: snapshot teacher and student; cached on the sources' content identity."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from tasks import artifacts

from kd.config import ModelRef, RunConfig
from kd.gguf import gguf_dtype
from kd.hub import pull_model, resolve_commit
from kd.results import ModelSnapshot
from tasks.policy import content_key, fresh_key, provenance, retry_transient


def source_fingerprint(ref: ModelRef, dtype: str = "float32", data=None) -> str:
    """What identifies a source's content without downloading it, and where it lives: the tiny
    models' folder, a local folder's listing (names, sizes, mtimes), or the hub commit the revision
    resolves to now (the cached one when offline). GGUF sources: the file's sha256 and the dtype it
    is converted to; pruned students: how they are pruned (the teacher's fingerprint is in the key
    beside it), and the transplant's format for one on another tokenizer and, for a measured layer choice, the calibration data: the content of `data.source` and the
    data config (the calibration blocks come from the run's prepared training split), or the content of `from_teacher.calibration` when it names its own text. Whether the files are on disk is *not* part of the key (it would differ between the
    run that makes them and every later one): a hit whose folders are gone is a miss (`_pull_key`)."""
    if ref.kind == "pruned":
        spec = ref.init.from_teacher
        init = ref.init.model_dump_json()
        if ref.init.tokenizer is not None:  # a transplanted student: what the transplant makes (its format)
            from kd.cross_tokenizer.student import TRANSPLANT_FORMAT

            init = f"{init}:transplant-{TRANSPLANT_FORMAT}"
        if spec.measured and spec.calibration is not None:  # the calibration text's content, not only its name
            from kd.bundled import text_files
            from kd.hashing import files_digest

            return f"pruned:{init}:calibration-text:{files_digest(text_files(spec.calibration))}"
        if spec.measured and data is not None:
            from kd.data import data_fingerprint

            conf = data.model_dump_json(exclude={"num_proc", "prepared_dir"})
            return f"pruned:{init}:calibration:{data_fingerprint(data)}:{conf}"
        return f"pruned:{init}"
    if ref.is_gguf:
        return _gguf_fingerprint(ref, dtype)
    if ref.kind == "tiny":
        from kd.tiny import tiny_dir

        folder = tiny_dir() / ref.repo.removeprefix("tiny:")
        return f"{ref.repo}@{folder}"
    if ref.kind == "local":
        root = Path(ref.repo).expanduser().resolve()
        return str([str(root)] + sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in root.rglob("*") if p.is_file()))
    return f"{ref.repo}@{resolve_commit(ref)}"


def _gguf_fingerprint(ref: ModelRef, dtype: str) -> str:
    from kd.hashing import sha256_memo

    if ref.kind == "local":
        path, where = Path(ref.repo).expanduser().resolve(), ref.repo
    else:
        from huggingface_hub import try_to_load_from_cache

        commit = resolve_commit(ref)
        cached = try_to_load_from_cache(ref.repo, str(ref.gguf_file), revision=commit)
        path, where = Path(cached) if isinstance(cached, str) else None, f"{ref.repo}@{commit}:{ref.gguf_file}"
    sha = sha256_memo(path) if path is not None and path.is_file() else None
    return f"gguf:{where}:{sha}:{dtype}"


def _pull_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    dtype = gguf_dtype(cfg.train.dtype, cfg.train.device)
    key = content_key("pull", source_fingerprint(cfg.teacher, dtype), source_fingerprint(cfg.student, dtype, cfg.data))
    return fresh_key(context, key, snapshots_problems, "pull_models")


def snapshots_problems(result: tuple[ModelSnapshot, ModelSnapshot]) -> list[str]:
    """Why cached snapshots cannot be reused: a model folder, or a file it listed, is gone."""
    out = []
    for snap in result:
        root = Path(snap.local_dir)
        missing = [f for f in snap.files if not (root / f).is_file()] if root.is_dir() else None
        if missing is None:
            out.append(f"{snap.role} folder {root} is gone")
        elif missing:
            out.append(f"{snap.role} files {', '.join(sorted(missing)[:3])} are gone from {root}")
    return out


@task(name="pull_models", cache_key_fn=_pull_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def pull_models(config: RunConfig) -> tuple[ModelSnapshot, ModelSnapshot]:
    dtype = gguf_dtype(config.train.dtype, config.train.device)  # GGUF weights are dequantized to this
    teacher = pull_model(config.teacher, "teacher", dtype=dtype)
    student = pull_model(config.student, "student", teacher=teacher, dtype=dtype, data=config.data)
    artifacts.pull_files(teacher, student)  # sizes in MB/GB, GGUF sources too
    artifacts.layer_choice_artifact(student)
    made = {"produced_by": provenance()}  # a cache hit keeps naming this run
    return teacher.model_copy(update=made), student.model_copy(update=made)

