"""The verdict rules, in one place: writing evidence and verifying it call the same functions.

    fs = recompute_falsifiers(training, vocab, eval_report, max_dropped_mass=0.01, eval_cfg=cfg.eval)
    status = run_status(fs + given, training=training, eval_report=eval_report, notes=notes)

`write_evidence` records `recompute_falsifiers(...)` of the results it is given; `verify_run_dir`
calls it again on the numbers the manifest records (training, vocab, eval: eval.json must hold
the same numbers) and on the config it records, and names every falsifier whose recorded verdict
differs. So flipping a verdict (or the status) to `pass` in manifest.json is caught without any
key; editing the numbers too is caught by the signature (kd/evidence/signing.py).
"""

from __future__ import annotations

from kd.config import EvalConfig
from kd.evaluate import eval_gates
from kd.evaluate.benchmarks import benchmark_gates
from kd.evaluate.control import value_gate
from kd.results import EvalReport, Falsifier, TrainResult, VocabAlignment

SMOKE_ID = "F-DISTILL-SMOKE-001"
VOCAB_ID = "F-DISTILL-VOCAB-001"


def training_falsifiers(training: TrainResult) -> list[Falsifier]:
    """F-DISTILL-SMOKE-001: final training loss < initial (NaN compares false, so it fails)."""
    ok = training.final_loss < training.initial_loss
    return [
        Falsifier(
            id=SMOKE_ID,
            claim="final training loss < initial training loss on a non-degenerate batch",
            observed=f"initial {training.initial_loss:.6g}, final {training.final_loss:.6g} "
            f"after {training.steps} steps",
            verdict="pass" if ok else "fail",
        )
    ]


def vocab_falsifiers(vocab: VocabAlignment, max_dropped_mass: float) -> list[Falsifier]:
    """F-DISTILL-VOCAB-001 when teacher rows were cut: the teacher's mean probability on them is
    ≤ kd.max_dropped_mass (the rows really are padding). Nothing when no rows were cut."""
    if vocab.dropped_mass_mean is None:
        return []
    ok = vocab.dropped_mass_mean <= max_dropped_mass
    return [
        Falsifier(
            id=VOCAB_ID,
            claim=f"teacher mean probability on the {vocab.teacher_rows - vocab.rows_kept} cut rows is "
            f"≤ kd.max_dropped_mass={max_dropped_mass:g}",
            observed=f"mean {vocab.dropped_mass_mean:.3g}, max {vocab.dropped_mass_max}",
            verdict="pass" if ok else "fail",
        )
    ]


def recompute_falsifiers(
    training: TrainResult | None, vocab: VocabAlignment | None, eval_report: EvalReport | None, *,
    max_dropped_mass: float, eval_cfg: EvalConfig,
) -> list[Falsifier]:
    """Every falsifier that follows from recorded numbers: training, vocab, and the eval gates."""
    out: list[Falsifier] = []
    if training is not None:
        out += training_falsifiers(training)
    if vocab is not None:
        out += vocab_falsifiers(vocab, max_dropped_mass)
    if eval_report is not None:
        e = eval_report
        out += eval_gates(e.teacher, e.student_before, e.student_after, e.vocab_size, eval_cfg,
                          on_samples=getattr(e, "on_samples", None),
                          cross_tokenizer=getattr(e, "cross_tokenizer", False))
        out += benchmark_gates(e.benchmarks, eval_cfg.benchmarks)  # optional lm-eval falsifiers (issue 20)
        if eval_cfg.control:  # distillation beat fine-tuning (issue 27), from the recorded per-document sums
            out.append(value_gate(getattr(e, "control", None)))
    return out


def run_status(falsifiers: list[Falsifier], *, training, eval_report, notes: list[str]) -> str:
    """`pass` only with at least one falsifier, all passing, training and eval present, no notes."""
    ok = (bool(falsifiers) and all(f.verdict == "pass" for f in falsifiers) and training is not None
          and eval_report is not None and not notes)
    return "pass" if ok else "fail"


def failure_reasons(falsifiers: list[Falsifier], notes: list[str], *, limit: int = 300) -> list[str]:
    """One short line per reason a run failed: each failing falsifier, each note."""
    out = [f"{f.id}: {f.observed}" for f in falsifiers if f.verdict != "pass"] + list(notes)
    return [r if len(r) <= limit else r[: limit - 1] + "…" for r in out] or ["no falsifier recorded"]
