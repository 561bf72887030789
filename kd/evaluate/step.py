"""The eval step: teacher, student-before and student-after on the held-out blocks, then the gates.

    report = evaluate_run(teacher, student_before, student_after, heldout_blocks, alignment,
                          cfg.eval, chunk_size=cfg.kd.chunk_size, device="cpu")
    if not report.passed: ...   # write evidence first, then fail the run (exit 1)
"""

from __future__ import annotations

import torch

from kd.config import EvalConfig
from kd.evaluate.gates import eval_gates
from kd.evaluate.heldout import evaluate_models
from kd.evaluate.control import reference_docs, score_documents
from kd.results import DocumentScores, EvalReport, ReferenceRetention, VocabAlignment


def evaluate_run(
    teacher_model: torch.nn.Module,
    student_before: torch.nn.Module,
    student_after: torch.nn.Module,
    blocks: torch.Tensor,
    alignment: VocabAlignment,
    eval_cfg: EvalConfig,
    *,
    chunk_size: int = 256,
    device="cpu",
    backend: str = "hf",
    on_samples=None,
    split=None,
    pair=None,
) -> EvalReport:
    """Teacher, student-before and student-after on the held-out `blocks` (one shared pass, the
    teacher's forward runs once per batch), plus the gates. Never raises on a failed gate.
    `on_samples` (a kd.evaluate.on_samples.SampleSpec): also score both students on their own samples of
    prompts from `split` (the held-out Split, whose loss mask says where assistant turns start).
    The verdict `cross-tokenizer` (needs `pair`, the TokenizerPair): bits per byte on the same bytes
    (kd/evaluate/cross_tokenizer.py), the KL gate stated on them; the on-sample eval is not run."""
    if alignment.verdict == "cross-tokenizer":
        rows = _cross_rows([teacher_model, student_before, student_after], teacher_model, blocks, pair, eval_cfg,
                           chunk_size, device, backend)
        v = alignment.valid_vocab
        return EvalReport(teacher=rows[0], student_before=rows[1], student_after=rows[2], vocab_size=v,
                          cross_tokenizer=True, gates=eval_gates(*rows, v, eval_cfg, cross_tokenizer=True))
    teacher_eval, before, after = evaluate_models(
        [teacher_model, student_before, student_after], teacher_model, blocks,
        compare=[False, True, True], rows_kept=alignment.rows_kept, valid_vocab=alignment.valid_vocab,
        batch_size=eval_cfg.batch_size, chunk_size=chunk_size, device=device,
        max_batches=eval_cfg.max_batches, backend=backend,
    )
    v = alignment.valid_vocab
    sampled = None
    if on_samples is not None:
        from kd.evaluate.on_samples import evaluate_on_samples

        sampled = evaluate_on_samples(teacher_model, student_before, student_after,
                                      split if split is not None else blocks, alignment, on_samples,
                                      chunk_size=chunk_size, device=device)
    return EvalReport(
        teacher=teacher_eval,
        student_before=before,
        student_after=after,
        vocab_size=v,
        gates=eval_gates(teacher_eval, before, after, v, eval_cfg, on_samples=sampled),
        on_samples=sampled,
    )


# ------------------------------------------------------------------ the eval step: baselines once, then the student
def _cross_rows(models, teacher, heldout, pair, ev, chunk_size, device, backend, tokenizer_dirs=None):
    """The cross-tokenizer rows; with `tokenizer_dirs` and a prepared held-out Split, its stored groups are read."""
    from kd.evaluate.cross_tokenizer import evaluate_cross

    if pair is None:
        raise ValueError("a cross-tokenizer eval needs the TokenizerPair (teacher's and student's tokenizers)")
    groups = None
    if tokenizer_dirs is not None and hasattr(heldout, "root"):
        from kd.cross_tokenizer.stored import stored_groups

        groups = stored_groups(heldout.root.parent, pair, tokenizer_dirs["teacher"], tokenizer_dirs["student_before"])
    return evaluate_cross(models, teacher, heldout, pair, batch_size=ev.batch_size, chunk_size=chunk_size,
                          device=device, max_batches=ev.max_batches, backend=backend, groups=groups)


def _pair_of(tokenizer_dirs: dict):
    from kd.cross_tokenizer.report import load_pair

    return load_pair(tokenizer_dirs["teacher"], tokenizer_dirs["student_before"])


def sample_spec(config, student_dir, heldout, prompts: int | None = None):
    """What is sampled from held-out prompts (kd/evaluate/on_samples.py): eval.on_sample_prompts prompts (or
    `prompts`) cut from the held-out split; None when that is 0."""
    from pathlib import Path

    from kd.data import open_prepared
    from kd.evaluate.on_samples import SampleSpec
    from kd.train.on_policy import stop_ids_of

    ev = config.eval
    n = ev.on_sample_prompts if prompts is None else prompts
    if n == 0:
        return None
    stops = stop_ids_of(student_dir)
    fmt = open_prepared(Path(heldout.root).parent).manifest.get("format", "text") if hasattr(heldout, "root") else "text"
    op = config.kd.on_policy
    return SampleSpec(stop_ids=frozenset(stops), pad_id=min(stops), fmt=fmt, prompts=n,
                      max_new_tokens=ev.on_sample_max_new_tokens, prompt_tokens=op.prompt_tokens,
                      max_prompt_tokens=op.max_prompt_tokens, seed=config.train.seed, batch_size=ev.batch_size)


def _samples(config, models: dict, student_dir, heldout, alignment, device, scorer=None):
    """Greedy completions of the fixed and the held-out prompts by `models` (kd/samples.py), each scored by
    `scorer` (the teacher; None across tokenizers)."""
    from kd.evaluate.on_samples import heldout_prompts
    from kd.samples import generate_samples

    n = config.eval.heldout_sample_prompts
    spec = sample_spec(config, student_dir, heldout, prompts=4 * n)  # rows that start alike give one prompt
    distinct = list(dict.fromkeys(tuple(p) for p in heldout_prompts(heldout, spec)))[:n] if spec else []
    return generate_samples(models, student_dir, config.eval.sample_prompts,
                            max_new_tokens=config.eval.sample_max_new_tokens, valid_vocab=alignment.valid_vocab,
                            device=device, heldout_prompt_ids=[list(p) for p in distinct],
                            repetition_penalty=config.eval.sample_repetition_penalty, scorer=scorer)


def evaluate_baselines(config, models: dict, tokenizer_dirs: dict, heldout, alignment, *, heldout_path, device="cpu",
                       backend: str = "hf", log=print):
    """What does not depend on training: the teacher's and student-before's held-out rows, their completions and
    benchmarks (`models` and `tokenizer_dirs`: teacher, student_before). A sweep computes it once for all its trials
    (tasks/evaluate.py caches it)."""
    from kd.evaluate.benchmarks import score_benchmarks
    from kd.results import BaselineEval

    ev, student_dir = config.eval, tokenizer_dirs["student_before"]
    cross = alignment.verdict == "cross-tokenizer"
    if cross:  # bits per byte on the same bytes; the teacher's completions and reference need its own tokenizer
        teacher_eval, before = _cross_rows([models["teacher"], models["student_before"]], models["teacher"], heldout,
                                           _pair_of(tokenizer_dirs), ev, config.kd.chunk_size, device, backend,
                                           tokenizer_dirs)
    else:
        teacher_eval, before = evaluate_models(
            [models["teacher"], models["student_before"]], models["teacher"], heldout, compare=[False, True],
            rows_kept=alignment.rows_kept, valid_vocab=alignment.valid_vocab, batch_size=ev.batch_size,
            chunk_size=config.kd.chunk_size, device=device, max_batches=ev.max_batches, backend=backend)
    bench = score_benchmarks(models, tokenizer_dirs, ev, student_dir=student_dir, heldout_path=heldout_path,
                             device=device, log=log)
    if cross:
        log("cross-tokenizer: the out-of-domain reference and the teacher's sample completions are not computed "
            "(both read the text through the student's tokenizer)")
        samples_of = {"student_before": models["student_before"]}
        return BaselineEval(teacher=teacher_eval, student_before=before, benchmarks=bench, reference=None,
                            samples=_samples(config, samples_of, student_dir, heldout, alignment, device))
    docs = reference_docs(config, student_dir)
    reference = None if docs is None else score_documents(
        [models["teacher"]], docs, _tokenizer(student_dir), valid_vocab=alignment.valid_vocab,
        chunk_size=config.kd.chunk_size, device=device, backend=backend, source="reference")
    return BaselineEval(teacher=teacher_eval, student_before=before, benchmarks=bench, reference=reference,
                        samples=_samples(config, models, student_dir, heldout, alignment, device,
                                         scorer=models["teacher"]))


def _tokenizer(student_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_dir)


def reference_retention(teacher: DocumentScores, student: DocumentScores) -> ReferenceRetention:
    """Teacher ÷ student bits per byte over the same reference documents."""
    import math

    n_bytes = sum(teacher.bytes)
    t, s = (sum(d.nll[0]) / math.log(2) / n_bytes if n_bytes else float("nan") for d in (teacher, student))
    return ReferenceRetention(documents=len(teacher.bytes), bytes=n_bytes, teacher_bits_per_byte=t,
                              student_bits_per_byte=s, retention=t / s if s > 0 else float("nan"))


def evaluate_student(config, models: dict, tokenizer_dirs: dict, baselines, heldout, alignment, *, heldout_path,
                     control_training=None, device="cpu", backend: str = "hf", log=print) -> EvalReport:
    """The trained student (and eval.control's control) against `baselines`: held-out row and gates, completions
    and benchmarks merged with the baselines', the on-sample eval, KD − control, and the ship verdict."""
    from kd.evaluate.ship import ship_verdict
    from kd.samples import merge_samples

    ev, student_dir = config.eval, tokenizer_dirs["student_before"]
    trained = {k: m for k, m in models.items() if k in ("student_after", "control")}
    if alignment.verdict == "cross-tokenizer":
        return _evaluate_student_cross(config, models, tokenizer_dirs, baselines, heldout, alignment, trained,
                                       heldout_path=heldout_path, device=device, backend=backend, log=log)
    (after,) = evaluate_models([models["student_after"]], models["teacher"], heldout, compare=[True],
                               rows_kept=alignment.rows_kept, valid_vocab=alignment.valid_vocab,
                               batch_size=ev.batch_size, chunk_size=config.kd.chunk_size, device=device,
                               max_batches=ev.max_batches, backend=backend)
    spec = sample_spec(config, student_dir, heldout)
    sampled = None
    if spec is not None:
        from kd.evaluate.on_samples import evaluate_on_samples

        sampled = evaluate_on_samples(models["teacher"], models["student_before"], models["student_after"], heldout,
                                      alignment, spec, chunk_size=config.kd.chunk_size, device=device)
    v = alignment.valid_vocab
    report = EvalReport(teacher=baselines.teacher, student_before=baselines.student_before, student_after=after,
                        vocab_size=v, on_samples=sampled,
                        gates=eval_gates(baselines.teacher, baselines.student_before, after, v, ev, on_samples=sampled),
                        samples=merge_samples(baselines.samples, _samples(config, trained, student_dir, heldout,
                                                                          alignment, device, scorer=models["teacher"])))
    report = _with_trained_benchmarks(report, trained, tokenizer_dirs, baselines, ev, student_dir=student_dir,
                                      heldout_path=heldout_path, device=device, log=log)
    mine = None
    if baselines.reference is not None:  # out of domain: the same documents the teacher was scored on
        docs = reference_docs(config, student_dir)
        mine = score_documents([models["student_after"]], docs, _tokenizer(student_dir), valid_vocab=v,
                               chunk_size=config.kd.chunk_size, device=device, backend=backend, source="reference")
        report = report.model_copy(update={"reference": reference_retention(baselines.reference, mine)})
    if control_training is not None:  # did distillation beat fine-tuning? (kd/evaluate/control.py)
        from kd.evaluate.control import compare_control

        report = report.model_copy(update={"control": compare_control(
            config, models, heldout, alignment, student_dir, control_training, after_reference=mine, device=device,
            backend=backend)})
    # would someone deploy it? beside the pipeline gates, from what the student says (kd/evaluate/ship.py)
    return report.model_copy(update={"ship": ship_verdict(report, ev.ship)})


def _with_trained_benchmarks(report: EvalReport, trained: dict, tokenizer_dirs: dict, baselines, ev, *, student_dir,
                             heldout_path, device, log) -> EvalReport:
    """`report` with the trained models' benchmarks merged beside the baselines' and the benchmark gates."""
    from kd.evaluate.benchmarks import merge_benchmarks, score_benchmarks, with_benchmarks

    bench = score_benchmarks(trained, tokenizer_dirs, ev, student_dir=student_dir, heldout_path=heldout_path,
                             device=device, log=log)
    return report if bench is None else with_benchmarks(report, merge_benchmarks(baselines.benchmarks, bench), ev, log=log)


def _evaluate_student_cross(config, models, tokenizer_dirs, baselines, heldout, alignment, trained, *, heldout_path,
                            device, backend, log) -> EvalReport:
    """evaluate_student for the verdict cross-tokenizer: bits per byte on the same bytes, the KL gate stated on them
    (kd/evaluate/gates.py bpb_gate), completions and benchmarks as usual; the on-sample eval, the reference and the
    control comparison read text through one tokenizer and are not run (their gates, when required, fail as
    not measured)."""
    from kd.evaluate.ship import ship_verdict
    from kd.samples import merge_samples

    ev, student_dir = config.eval, tokenizer_dirs["student_before"]
    (after,) = _cross_rows([models["student_after"]], models["teacher"], heldout, _pair_of(tokenizer_dirs), ev,
                           config.kd.chunk_size, device, backend, tokenizer_dirs)
    v = alignment.valid_vocab
    report = EvalReport(teacher=baselines.teacher, student_before=baselines.student_before, student_after=after,
                        vocab_size=v, cross_tokenizer=True,
                        gates=eval_gates(baselines.teacher, baselines.student_before, after, v, ev, cross_tokenizer=True),
                        samples=merge_samples(baselines.samples,
                                              _samples(config, trained, student_dir, heldout, alignment, device)))
    report = _with_trained_benchmarks(report, trained, tokenizer_dirs, baselines, ev, student_dir=student_dir,
                                      heldout_path=heldout_path, device=device, log=log)
    return report.model_copy(update={"ship": ship_verdict(report, ev.ship)})
