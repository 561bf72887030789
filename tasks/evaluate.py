"""Task `evaluate`: held-out metrics for teacher, student-before and student-after, and the gates.

A failed gate is not an exception here: it is recorded, the evidence step writes it down and
the flow then fails the run. Cached on the checkpoint's content and the eval config.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from safetensors.torch import load_file
from tasks import artifacts

from backends import get_backend
from kd.config import RunConfig
from kd.data import data_fingerprint, open_prepared
from kd.errors import ModelError
from kd.evaluate import evaluate_run
from kd.evaluate.benchmarks import benchmark_eval, definitions_fingerprint
from kd.evaluate.control import compare_control
from kd.evaluate.on_samples import heldout_prompts
from kd.evaluate.ship import ship_line, ship_verdict
from kd.results import EvalReport, ModelSnapshot, PreparedData, TrainResult, VocabAlignment
from kd.samples import generate_samples, samples_markdown
from kd.train import resolve_device
from tasks.policy import content_key, provenance, retry_transient


def _eval_key(context, parameters) -> str:
    cfg: RunConfig = parameters["config"]
    return content_key("eval", parameters["training"].checkpoint_sha256, parameters["teacher"].content_hash,
                       parameters["student"].content_hash, parameters["alignment"].identity(),
                       cfg.eval.model_dump(), cfg.data.model_dump(exclude={"num_proc"}), _data_key(parameters),
                       cfg.kd.chunk_size, *_bench_key(cfg), _control_key(parameters),
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


def sample_spec(config: RunConfig, student_dir, heldout, prompts: int | None = None):
    """What the on-sample eval samples (kd/evaluate/on_samples.py): eval.on_sample_prompts prompts (or `prompts`)
    cut from the held-out split; None when that is 0."""
    ev = config.eval
    n = ev.on_sample_prompts if prompts is None else prompts
    if n == 0:
        return None
    from kd.evaluate.on_samples import SampleSpec
    from kd.on_policy import stop_ids_of

    stops = stop_ids_of(student_dir)
    fmt = open_prepared(Path(heldout.root).parent).manifest.get("format", "text") if hasattr(heldout, "root") else "text"
    op = config.kd.on_policy
    return SampleSpec(stop_ids=frozenset(stops), pad_id=min(stops), fmt=fmt, prompts=n,
                      max_new_tokens=ev.on_sample_max_new_tokens, prompt_tokens=op.prompt_tokens,
                      max_prompt_tokens=op.max_prompt_tokens, seed=config.train.seed, batch_size=ev.batch_size)


@task(name="evaluate", cache_key_fn=_eval_key, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def evaluate(
    config: RunConfig, teacher: ModelSnapshot, student: ModelSnapshot, alignment: VocabAlignment,
    training: TrainResult, prepared: PreparedData | None = None, control: TrainResult | None = None,
) -> EvalReport:
    outputs = [("checkpoint", training.checkpoint_dir), ("held-out data", training.heldout_path)]
    for what, path in outputs + ([("control checkpoint", control.checkpoint_dir)] if control is not None else []):
        if not Path(path).exists():
            raise ModelError(f"{what} {path} no longer exists (a cached training result from an earlier "
                             "run whose folder was removed): run again with --no-cache")
    device, dtype, _ = resolve_device(config)
    backend = get_backend("hf")
    load = lambda d, ref: backend.load(d, device=device, dtype=dtype, trust_remote_code=ref.trust_remote_code)  # noqa: E731
    # the held-out split of the prepared set training read (a folder), or an older run's safetensors blocks
    heldout = (open_prepared(training.heldout_path).heldout if Path(training.heldout_path).is_dir()
               else load_file(training.heldout_path)["heldout"])
    models = {"teacher": load(teacher.local_dir, config.teacher),
              "student_before": load(student.local_dir, config.student),
              "student_after": load(training.checkpoint_dir, config.student)}
    if control is not None:  # eval.control: the fine-tuned control rides along in samples and benchmarks
        models["control"] = load(control.checkpoint_dir, config.student)
    report = evaluate_run(
        models["teacher"], models["student_before"], models["student_after"], heldout, alignment, config.eval,
        chunk_size=config.kd.chunk_size, device=device, on_samples=sample_spec(config, student.local_dir, heldout),
    )
    # what the numbers mean, readable: greedy completions of fixed and held-out prompts (kd/samples.py)
    heldout_spec = sample_spec(config, student.local_dir, heldout, prompts=config.eval.heldout_sample_prompts)
    samples = generate_samples(models, student.local_dir, config.eval.sample_prompts,
                               max_new_tokens=config.eval.sample_max_new_tokens,
                               valid_vocab=alignment.valid_vocab, device=device,
                               heldout_prompt_ids=heldout_prompts(heldout, heldout_spec) if heldout_spec else [])
    report = report.model_copy(update={"samples": samples})
    if samples:
        create_markdown_artifact(key="sample-generations", markdown=samples_markdown(samples),
                                 description="Greedy completions: teacher, student-before, student-after")
    # lm-eval downstream benchmarks on the same three models (eval.benchmarks; kd/evaluate/benchmarks.py)
    report = benchmark_eval(report, models, {"teacher": teacher.local_dir, "student_before": student.local_dir,
                                             "student_after": student.local_dir, "control": student.local_dir},
                            config.eval,
                            heldout_path=training.heldout_path, device=device, log=get_run_logger().info)
    if control is not None:  # did distillation beat fine-tuning? (kd/evaluate/control.py)
        report = report.model_copy(update={"control": compare_control(
            config, models, heldout, alignment, student.local_dir, control, device=device)})
        artifacts.control_table(report.control)
    # would someone deploy it? beside the pipeline gates, from what the student says (kd/evaluate/ship.py)
    report = report.model_copy(update={"ship": ship_verdict(report, config.eval.ship)})
    get_run_logger().info(ship_line(report.ship))
    artifacts.eval_comparison(report)  # 4 significant figures and an `after − before` row
    if report.benchmarks is not None:
        artifacts.benchmarks_table(report.benchmarks)
    return report.model_copy(update={"produced_by": provenance()})  # a cache hit keeps naming this run
