"""Task `pull_models`: snapshot teacher and student; cached on the sources' content identity."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from tasks import artifacts

from kd.config import ModelRef, RunConfig
from kd.hub import pull_model, resolve_commit
from kd.results import ModelSnapshot
from tasks.policy import content_key, retry_transient


def source_fingerprint(ref: ModelRef) -> str:
    """What identifies a source's content without downloading it, and where it lives: the tiny
    models' folder, a local folder's listing (names, sizes, mtimes), or the hub commit the revision
    resolves to now (the cached one when offline). Whether the files are still on disk is part of
    the key, so a cache hit never hands eval a snapshot folder that has since been deleted."""
    if ref.kind == "tiny":
        from kd.tiny import tiny_dir

        folder = tiny_dir() / ref.repo.removeprefix("tiny:")
        return f"{ref.repo}@{folder}:{(folder / 'model.safetensors').is_file()}"
    if ref.kind == "local":
        root = Path(ref.repo).expanduser().resolve()
        return str([str(root)] + sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in root.rglob("*") if p.is_file()))
    from huggingface_hub import try_to_load_from_cache

    commit = resolve_commit(ref)
    cached = try_to_load_from_cache(ref.repo, "config.json", revision=commit)
    return f"{ref.repo}@{commit}:{isinstance(cached, str)}"


def _pull_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    return content_key("pull", source_fingerprint(cfg.teacher), source_fingerprint(cfg.student))


@task(name="pull_models", cache_key_fn=_pull_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def pull_models(config: RunConfig) -> tuple[ModelSnapshot, ModelSnapshot]:
    teacher = pull_model(config.teacher, "teacher")
    student = pull_model(config.student, "student")
    artifacts.pull_files(teacher, student)  # sizes in MB/GB
    return teacher, student
