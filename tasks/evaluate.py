"""Tasks `evaluate_baselines` and `evaluate`: the teacher and student-before once, then the trained student.

`evaluate_baselines` holds what training cannot change (teacher and student-before: held-out rows,
completions, benchmarks); it is cached on the models, data and eval settings only, so every trial of a
sweep (and every rerun) reuses one. `evaluate` adds the trained student (and eval.control's control):
gates, on-sample eval, KD − control, the ship verdict. A failed gate is not an exception here: it is
recorded, the evidence step writes it down and the flow then fails the run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from safetensors.torch import load_file

from backends import get_backend
from kd.config import RunConfig
from kd.data import data_fingerprint, open_prepared
from kd.errors import ModelError
from kd.evaluate.benchmarks import definitions_fingerprint
from kd.evaluate.ship import ship_line
from kd.evaluate.step import evaluate_baselines as baselines_of, evaluate_student
from kd.hashing import code_version
from kd.results import BaselineEval, EvalReport, ModelSnapshot, PreparedData, TrainResult, VocabAlignment
from kd.samples import samples_markdown
from kd.train.loop import resolve_device
from tasks import artifacts
from tasks.policy import content_key, provenance, retry_transient


def _baseline_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    ev, op = cfg.eval, cfg.kd.on_policy
    return content_key("eval-baselines", parameters["teacher"].content_hash, parameters["student"].content_hash,
                       parameters["alignment"].identity(), cfg.data.model_dump(exclude={"num_proc"}),
                       _data_key(parameters), ev.batch_size, ev.max_batches, ev.sample_prompts, ev.sample_max_new_tokens,
                       ev.sample_repetition_penalty, ev.heldout_sample_prompts, ev.benchmarks.model_dump(),
                       ev.reference_text, *_bench_key(cfg),
                       cfg.kd.chunk_size, cfg.train.seed, op.prompt_tokens, op.max_prompt_tokens,
                       str(resolve_device(cfg)[:2]), code_version())


def _eval_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    return content_key("eval", parameters["training"].checkpoint_sha256, parameters["teacher"].content_hash,
                       parameters["student"].content_hash, parameters["alignment"].identity(),
                       cfg.eval.model_dump(), cfg.data.model_dump(exclude={"num_proc"}), _data_key(parameters),
                       cfg.kd.chunk_size, *_bench_key(cfg), _control_key(parameters), cfg.train.seed, code_version(),
                       *([cfg.kd.on_policy.prompt_tokens, cfg.kd.on_policy.max_prompt_tokens]
                         if cfg.eval.on_sample_prompts else []))  # the on-sample eval's prompts


def _control_key(parameters):
    control = parameters.get("control")
    return None if control is None else control.checkpoint_sha256


def _bench_key(cfg: RunConfig) -> list:
    # lm-eval benchmarks: task definitions, their data files, the bundled tasks' code, the lm-eval version
    return [definitions_fingerprint(cfg.eval.benchmarks, cfg.eval.reference_text)] if cfg.eval.benchmarks.tasks else []


def _data_key(parameters):
    prepared = parameters.get("prepared")
    if prepared is not None:
        return [prepared.content_hash, Path(prepared.path, "manifest.json").is_file()]
    return data_fingerprint(parameters["config"].data)


def _loader(config: RunConfig):
    device, dtype, _ = resolve_device(config)
    backend = get_backend("hf")
    return device, lambda d, ref: backend.load(d, device=device, dtype=dtype, trust_remote_code=ref.trust_remote_code)


def _heldout(path: str):
    """The held-out split of the prepared set training read (a folder), or an older run's safetensors blocks."""
    return open_prepared(path).heldout if Path(path).is_dir() else load_file(path)["heldout"]


@task(name="evaluate_baselines", cache_key_fn=_baseline_key, persist_result=True, retries=1,
      retry_condition_fn=retry_transient)
def evaluate_baselines(config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment,
                       prepared: PreparedData) -> BaselineEval:
    device, load = _loader(config)
    models = {"teacher": load(teacher.local_dir, config.teacher), "student_before": load(student.local_dir, config.student)}
    base = baselines_of(config, models, {"teacher": teacher.local_dir, "student_before": student.local_dir},
                        _heldout(prepared.path), alignment, heldout_path=prepared.path, device=device,
                        log=get_run_logger().info)
    return base.model_copy(update={"produced_by": provenance()})  # a cache hit keeps naming this run


@task(name="evaluate", cache_key_fn=_eval_key, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def evaluate(
    config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment,
    training: TrainResult, prepared: PreparedData | None = None, control: TrainResult | None = None,
    baselines: BaselineEval | None = None,
) -> EvalReport:
    outputs = [("checkpoint", training.checkpoint_dir), ("held-out data", training.heldout_path)]
    for what, path in outputs + ([("control checkpoint", control.checkpoint_dir)] if control is not None else []):
        if not Path(path).exists():
            raise ModelError(f"{what} {path} no longer exists (a cached training result from an earlier "
                             "run whose folder was removed): run again with --no-cache")
    device, load = _loader(config)
    heldout, log = _heldout(training.heldout_path), get_run_logger().info
    models = {"teacher": load(teacher.local_dir, config.teacher), "student_before": load(student.local_dir, config.student),
              "student_after": load(training.checkpoint_dir, config.student)}
    if control is not None:  # eval.control: the fine-tuned control rides along in samples and benchmarks
        models["control"] = load(control.checkpoint_dir, config.student)
    dirs = {"teacher": teacher.local_dir, **{k: student.local_dir for k in models if k != "teacher"}}
    if baselines is None:  # called without the baselines step (an older flow): compute them here
        baselines = baselines_of(config, {k: models[k] for k in ("teacher", "student_before")}, dirs, heldout,
                                 alignment, heldout_path=training.heldout_path, device=device, log=log)
    report = evaluate_student(config, models, dirs, baselines, heldout, alignment, heldout_path=training.heldout_path,
                              control_training=control, device=device, log=log)
    log(ship_line(report.ship))
    if report.samples:
        create_markdown_artifact(key="sample-generations", markdown=samples_markdown(report.samples),
                                 description="Greedy completions: teacher, student-before, student-after")
    artifacts.eval_comparison(report)  # 4 significant figures and an `after − before` row
    if report.control is not None:
        artifacts.control_table(report.control)
    if report.benchmarks is not None:
        artifacts.benchmarks_table(report.benchmarks)
    return report.model_copy(update={"produced_by": provenance()})  # a cache hit keeps naming this run
