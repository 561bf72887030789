"""The `kd-train-node` flow: one node of a multi-node training (`train.rendezvous.nnodes = M > 1`).

The `train_student` task starts M runs of this flow's deployment (`orchestration.node_deployment`, default
`kd-train-node/gpu`) against one rendezvous and watches them as one job: tasks/train.py. Each run
pulls the models where this node does not see them and runs torchrun for its node
(kd.train.distributed.nodes.run_node).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from kd.config import RunConfig
from kd.errors import ConfigError
from kd.results import ModelSnapshot, PreparedData, TeacherCacheResult, VocabAlignment


@flow(name="kd-train-node", flow_run_name="train-{run_name}-node{node_rank}", log_prints=True,
      validate_parameters=True)
def kd_train_node(
    config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment, run_name: str,
    node_rank: int, endpoint: str, rdzv_id: str, store_is_elsewhere: bool, probe: str,
    prepared: PreparedData | None = None, teacher_cache: TeacherCacheResult | None = None,
) -> dict:
    """One node of a multi-node training: torchrun for node `node_rank` against `endpoint`."""
    from kd.train.distributed.nodes import run_node

    log = get_run_logger()
    teacher_dir = node_local_dir(config, teacher, "teacher")
    student_dir = node_local_dir(config, student, "student", teacher=teacher.model_copy(update={"local_dir": teacher_dir}))
    prepared_dir = prepared.path if prepared is not None and Path(prepared.path).is_dir() else None
    if prepared is not None and prepared_dir is None:
        log.warning("prepared data %s not visible on this node: the ranks pack data.source themselves", prepared.path)
    run_dir = Path(config.work_dir).expanduser().resolve() / run_name

    def on_event(event: dict) -> None:
        if event.get("kind") == "step":
            log.info("step %d/%d loss=%.5f (%d ranks)", event["step"], event["total_steps"], event["loss"],
                     event["world_size"])
        elif event.get("kind") in ("log", "error"):
            log.info("rank 0: %s", event.get("msg"))

    return run_node(config, teacher_dir, student_dir, alignment, run_dir, node_rank=node_rank, endpoint=endpoint,
                    rdzv_id=rdzv_id, store_is_elsewhere=store_is_elsewhere, probe=probe, prepared_dir=prepared_dir,
                    teacher_cache=teacher_cache, on_event=on_event,
                    on_line=lambda line: log.info("torchrun | %s", line))


def node_local_dir(config: RunConfig, snap: ModelSnapshot, role: str, teacher: ModelSnapshot | None = None) -> str:
    """The snapshot's folder if this node sees it, else pulled here (same content hash, or ConfigError). As the
    pull_models step does: a `from-teacher` student is built from the teacher's snapshot (`teacher`, already
    local on this node), and a GGUF is dequantized to the run's training dtype."""
    if Path(snap.local_dir).is_dir():
        return snap.local_dir
    from kd.gguf import gguf_dtype
    from kd.hub import pull_model

    here = pull_model(getattr(config, role), role, teacher=teacher, data=config.data,
                      dtype=gguf_dtype(config.train.dtype, config.train.device))
    if here.content_hash != snap.content_hash:
        raise ConfigError(f"{role}.repo: this node pulled content {here.content_hash[:12]}, the run trained "
                          f"from {snap.content_hash[:12]}: pin {role}.revision")
    return here.local_dir
