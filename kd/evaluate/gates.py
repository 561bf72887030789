"""The no-fake-pass eval gates: `Falsifier`s computed from an eval table, never raising.

A failed gate is recorded with verdict `fail`; the caller writes the evidence and then fails the
run. Every gate is written fail-closed: NaN compares false, so a metric that is not a real number
can never satisfy a claim. `kd.evidence.verdicts` recomputes them from a manifest with these functions.
"""

from __future__ import annotations

import math

from kd.config import EvalConfig
from kd.results import Falsifier, ModelEval, OnSampleReport

FINITE_ID = "F-DISTILL-FINITE-001"
COLLAPSE_ID = "F-DISTILL-COLLAPSE-001"
UNIFORM_ID = "F-DISTILL-UNIFORM-001"
KL_ID = "F-DISTILL-EVAL-001"
ON_SAMPLE_ID = "F-DISTILL-ONPOLICY-001"

# every metric of a ModelEval row that the finite gate checks
METRICS = ("loss", "perplexity", "kl_to_teacher", "top1_agreement", "entropy", "top_token_share", "bits_per_byte",
           "group_kl_to_teacher", "group_top1_agreement")
BPB_ID = "F-DISTILL-BPB-001"
GROUP_KL_ID = "F-DISTILL-GROUPKL-001"


def _fmt(x: float | None) -> str:
    return "None" if x is None else f"{x:.6g}"


def finite_gate(evals: dict[str, ModelEval]) -> Falsifier:
    """F-DISTILL-FINITE-001: every measured metric of every model is a finite number."""
    bad = [
        f"{name}.{k}={_fmt(getattr(ev, k))}"
        for name, ev in evals.items()
        for k in METRICS
        if getattr(ev, k) is not None and not math.isfinite(getattr(ev, k))
    ]
    bad += [f"{name}.tokens=0" for name, ev in evals.items() if ev.tokens <= 0]
    return Falsifier(
        id=FINITE_ID,
        claim="every eval metric (loss, perplexity, KL, agreement, entropy, top-token share) of "
        f"{', '.join(evals)} is finite, over > 0 tokens",
        observed="all finite" if not bad else "non-finite: " + ", ".join(bad),
        verdict="pass" if not bad else "fail",
    )


def uniform_gate(after: ModelEval, vocab_size: int, cfg: EvalConfig, before: ModelEval | None = None) -> Falsifier:
    """F-DISTILL-UNIFORM-001: the trained student predicts held-out tokens better than a uniform guess.

    A uniform guess over V ids has perplexity V; the gate asks for < f·V (f = `uniform_perplexity_fraction`).
    Failing it is not the same as collapsed: the advice depends on whether training moved the student
    towards the data (not there yet) or away from it (diverged: confidently wrong)."""
    limit = cfg.uniform_perplexity_fraction * vocab_size
    ok = after.perplexity < limit  # NaN compares false: fail-closed
    observed = f"perplexity {_fmt(after.perplexity)} vs {_fmt(limit)} ({cfg.uniform_perplexity_fraction:g}×V)"
    if not ok:
        if before is not None and after.perplexity > before.perplexity:
            advice = (f"training made it worse (student-before perplexity {_fmt(before.perplexity)}): the updates "
                      "diverged; lower train.lr, add train.warmup_steps, check the loss curve")
        elif before is not None and not after.perplexity < before.perplexity:
            advice = (f"training did not move it (student-before perplexity {_fmt(before.perplexity)}): check that "
                      "train.lr and train.steps are not ~0 and that data.train_on leaves tokens to learn")
        else:
            since = "" if before is None else f" (student-before perplexity {_fmt(before.perplexity)})"
            advice = (f"training has not taken it far enough yet{since}: train more steps or at a higher train.lr; "
                      "a pruned or untrained student starts far from its teacher")
        observed = (f"WORSE THAN UNIFORM: {observed}; a uniform guess over V={vocab_size} scores perplexity "
                    f"{vocab_size}. Not the same as collapsed (F-DISTILL-COLLAPSE-001 says whether it is): {advice}")
    return Falsifier(
        id=UNIFORM_ID,
        claim=f"student-after predicts held-out tokens better than a uniform guess over V={vocab_size}: "
        f"perplexity < {cfg.uniform_perplexity_fraction:g}×V",
        observed=observed, verdict="pass" if ok else "fail",
    )


def collapse_gate(after: ModelEval, teacher: ModelEval, vocab_size: int, cfg: EvalConfig) -> Falsifier:
    """F-DISTILL-COLLAPSE-001: the trained student is not collapsed.

    Collapsed = one argmax token at ≥ `max_top_token_share` of positions (unless the teacher is at least
    as peaked: then it is the data, not the student), or mean entropy ≥ e·log V (it predicts the uniform
    distribution whatever the context). Each check is written as "healthy if <", so NaN fails.
    """
    log_v = math.log(vocab_size)
    ent_limit = cfg.collapse_entropy_fraction * log_v
    share_limit = cfg.max_top_token_share
    # A teacher that itself predicts one token this often says the data is that repetitive.
    share_ok = after.top_token_share < share_limit or (
        teacher.top_token_share >= share_limit and after.top_token_share <= teacher.top_token_share
    )
    share = f"top-token share {_fmt(after.top_token_share)}"
    entropy = f"entropy {_fmt(after.entropy)}"
    checks = [  # (healthy?, as said when healthy, as said when not)
        (share_ok, f"{share} < {share_limit:g} (teacher {_fmt(teacher.top_token_share)})",
         f"{share} ≥ {share_limit:g} (teacher {_fmt(teacher.top_token_share)}): one token at nearly every position"),
        (after.entropy < ent_limit, f"{entropy} < {_fmt(ent_limit)} ({cfg.collapse_entropy_fraction:g}·log V)",
         f"{entropy} ≥ {_fmt(ent_limit)} ({cfg.collapse_entropy_fraction:g}·log V): the uniform distribution"),
    ]
    failed = [bad for ok, _, bad in checks if not ok]
    observed = "; ".join(good for _, good, _ in checks)
    if failed:
        observed = ("COLLAPSED: " + "; ".join(failed) + ". The student predicts one token, or the uniform "
                    "distribution, whatever the context: lower train.lr or add warm-up, raise kd.alpha (more CE on "
                    "the data), and check data.train_on leaves real tokens to learn")
    return Falsifier(
        id=COLLAPSE_ID,
        claim=f"student-after is not collapsed over V={vocab_size}: no single token predicted at ≥ {share_limit:g} "
        f"of positions (unless the teacher is as peaked), entropy < {cfg.collapse_entropy_fraction:g}·log V",
        observed=observed, verdict="pass" if not failed else "fail",
    )


def kl_gate(before: ModelEval, after: ModelEval) -> Falsifier:
    """F-DISTILL-EVAL-001: distillation moved the student towards the teacher on held-out data."""
    ok = (
        before.kl_to_teacher is not None
        and after.kl_to_teacher is not None
        and after.kl_to_teacher < before.kl_to_teacher
    )
    return Falsifier(
        id=KL_ID,
        claim="student-after KL(teacher‖student) at T=1 on held-out data is below student-before's",
        observed=f"before {_fmt(before.kl_to_teacher)}, after {_fmt(after.kl_to_teacher)}",
        verdict="pass" if ok else "fail",
    )


def bpb_gate(teacher: ModelEval, before: ModelEval, after: ModelEval) -> Falsifier:
    """F-DISTILL-BPB-001 (cross-tokenizer runs, in place of the KL gate): student-after's held-out bits per byte is
    below student-before's, on the same bytes the teacher is scored on. Per-token KL(teacher||student) and top-1
    agreement need one vocabulary and are not applicable across tokenizers (stated in the claim, never a silent
    pass); group_kl_gate restates the KL claim on byte-aligned groups."""
    ok = before.bits_per_byte is not None and after.bits_per_byte is not None and after.bits_per_byte < before.bits_per_byte
    return Falsifier(
        id=BPB_ID,
        claim="student-after held-out bits per byte is below student-before's (the same bytes for every model; "
        "per-token KL and top-1 agreement are not applicable across tokenizers: no shared vocabulary; restated on "
        f"byte-aligned groups in {GROUP_KL_ID})",
        observed=f"before {_fmt(before.bits_per_byte)}, after {_fmt(after.bits_per_byte)}, "
        f"teacher {_fmt(teacher.bits_per_byte)} bits/byte",
        verdict="pass" if ok else "fail",
    )


def group_kl_gate(before: ModelEval, after: ModelEval) -> Falsifier:
    """F-DISTILL-GROUPKL-001 (cross-tokenizer runs, the KL gate restated on byte-aligned groups): student-after's mean
    group KL(teacher||student) on held-out data is below student-before's (kd/cross_tokenizer/group_eval.py). Not
    measured (None, a row recorded without group numbers) or NaN: fail."""
    ok = (before.group_kl_to_teacher is not None and after.group_kl_to_teacher is not None
          and after.group_kl_to_teacher < before.group_kl_to_teacher)
    return Falsifier(
        id=GROUP_KL_ID,
        claim="student-after KL(teacher‖student) on held-out byte-aligned groups (binary: the group's realized text "
        "vs anything else, chain-rule probabilities on each side's own tokens) is below student-before's",
        observed=f"before {_fmt(before.group_kl_to_teacher)}, after {_fmt(after.group_kl_to_teacher)} nats/group over "
        f"{after.groups} groups; group top-1 agreement {_fmt(before.group_top1_agreement)} → "
        f"{_fmt(after.group_top1_agreement)}",
        verdict="pass" if ok else "fail",
    )


def on_sample_gate(report: OnSampleReport | None) -> Falsifier:
    """F-DISTILL-ONPOLICY-001: on completions each samples itself from the same held-out prompts, student-after's
    per-token reverse KL to the teacher is below student-before's (not measured, or NaN: fail)."""
    ok = (report is not None and report.after.tokens > 0 and report.before.tokens > 0
          and report.after.reverse_kl < report.before.reverse_kl)
    observed = ("not measured (eval.on_sample_prompts is 0)" if report is None else
                f"before {_fmt(report.before.reverse_kl)} over {report.before.tokens} tokens, after "
                f"{_fmt(report.after.reverse_kl)} over {report.after.tokens} tokens (teacher NLL "
                f"{_fmt(report.before.teacher_nll)} → {_fmt(report.after.teacher_nll)})")
    return Falsifier(
        id=ON_SAMPLE_ID,
        claim="student-after KL(student‖teacher) per generated token, on its own T=1 samples of held-out prompts, "
        "is below student-before's on its own samples",
        observed=observed, verdict="pass" if ok else "fail",
    )


def eval_gates(
    teacher: ModelEval, before: ModelEval, after: ModelEval, vocab_size: int, cfg: EvalConfig,
    on_samples: OnSampleReport | None = None, cross_tokenizer: bool = False,
) -> list[Falsifier]:
    """All gates for an eval table. The KL gate is present only when `cfg.require_kl_improvement`, the on-sample
    gate only when `cfg.require_on_sample_improvement` (an unchecked claim is left out rather than written
    down as a pass). `cross_tokenizer`: the KL gate is stated on bits per byte (bpb_gate) and on byte-aligned
    groups (group_kl_gate)."""
    gates = [
        finite_gate({"teacher": teacher, "student_before": before, "student_after": after}),
        uniform_gate(after, vocab_size, cfg, before),
        collapse_gate(after, teacher, vocab_size, cfg),
    ]
    if cfg.require_kl_improvement:
        gates += ([bpb_gate(teacher, before, after), group_kl_gate(before, after)] if cross_tokenizer
                  else [kl_gate(before, after)])
    if cfg.require_on_sample_improvement:
        gates.append(on_sample_gate(on_samples))
    return gates


