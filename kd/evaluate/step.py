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
from kd.results import EvalReport, VocabAlignment


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
) -> EvalReport:
    """Teacher, student-before and student-after on the held-out `blocks` (one shared pass, the
    teacher's forward runs once per batch), plus the gates. Never raises on a failed gate.
    `on_samples` (a kd.evaluate.on_samples.SampleSpec): also score both students on their own samples of
    prompts from `split` (the held-out Split, whose loss mask says where assistant turns start)."""
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
