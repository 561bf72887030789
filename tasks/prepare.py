"""Task `prepare_data`: tokenise, split by document and pack `data.source` once, for every later step.

Cached on the source files' content, the student tokenizer's files, the data config and the code
version; a hit whose prepared folder has since been deleted or changed is a miss (checked on the hit,
not put into the key: a key that says "the folder exists" differs between the run that makes the
folder and every later one, so the first result could never be hit). The artifact shows counts, the length histogram and two decoded samples with
the part that carries no loss marked. With kd.cross_tokenizer enabled, the teacher's tokens and the byte-aligned
groups of every block are stored beside the set (kd/cross_tokenizer/stored.py), keyed by both tokenizers: the
teacher's tokenizer is then part of this step's key.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from kd.config import RunConfig
from kd.data import fingerprint, model_max_positions, prepare_data, prepared_base, tokenizer_fingerprint
from kd.hashing import code_version
from kd.results import ModelSnapshot, PreparedData
from tasks import artifacts
from tasks.policy import content_key, fresh_key, provenance, retry_transient


def _prepare_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    student: ModelSnapshot = parameters["student"]
    fp = fingerprint(cfg.data, student.local_dir)  # source content + tokenizer + data config + kd/data code
    teacher = parameters.get("teacher")
    groups = (tokenizer_fingerprint(teacher.local_dir) if cfg.kd.cross_tokenizer.enabled and teacher is not None
              else None)  # the stored groups depend on the teacher's tokenizer
    key = content_key("prepare", fp, str(prepared_base(cfg.data)), cfg.train.batch_size, code_version(),
                      *([groups] if groups else []))
    return fresh_key(context, key, prepared_problems, "prepare_data")


def prepared_problems(result: PreparedData) -> list[str]:
    """Why a cached PreparedData cannot be reused: its folder or manifest is gone, or the manifest no
    longer records the content hash the result carries (the set was rebuilt or edited since)."""

    manifest = Path(result.path) / "manifest.json"
    if not manifest.is_file():
        return [f"prepared set {result.path} is gone"]
    try:
        recorded = json.loads(manifest.read_text()).get("content_hash")
    except (OSError, ValueError) as err:
        return [f"prepared manifest {manifest} is unreadable ({err})"]
    return [] if recorded == result.content_hash else [f"prepared set {result.path} changed since it was cached"]


@task(name="prepare_data", cache_key_fn=_prepare_key, persist_result=True, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def prepare_data_task(config: RunConfig, student: ModelSnapshot, teacher: ModelSnapshot | None = None) -> PreparedData:
    result = prepare_data(config.data, Path(student.local_dir), max_positions=model_max_positions(student.local_dir),
                          min_train_blocks=config.train.batch_size)
    if config.kd.cross_tokenizer.enabled and teacher is not None:
        from kd.cross_tokenizer.report import load_pair
        from kd.cross_tokenizer.stored import MARKER, ensure_groups

        folder = ensure_groups(result.path, load_pair(teacher.local_dir, student.local_dir), teacher.local_dir,
                               student.local_dir)
        info = json.loads((folder / MARKER).read_text())
        get_run_logger().info("cross-tokenizer groups stored at %s: %s, built in %.2f s", folder, info["splits"],
                              info["build_s"])
    create_markdown_artifact(key="prepared-data", markdown=artifacts.prepared_markdown(result),
                             description="Documents, tokens, skipped/truncated/dropped counts, samples")
    return result.model_copy(update={"produced_by": provenance()})  # a cache hit keeps naming this run
