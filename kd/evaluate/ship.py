"""The ship verdict: would someone deploy this student? A second verdict beside the pipeline gates.

    verdict = ship_verdict(report, cfg.eval.ship)    # ShipVerdict: "ship" | "dont_ship", checks, reasons

The pipeline gates (kd/evaluate/gates.py) say the run worked: numbers finite, better than before and than
a uniform guess, not collapsed. A student that answers every prompt with twelve newlines passes all of
them. The ship verdict looks at what the student *does*:
- its greedy completions of the fixed sample prompts and of held-out prompts (`eval.sample_prompts`,
  `eval.heldout_sample_prompts`), decoded as it will be deployed (`eval.sample_repetition_penalty`, 1.0 = plain
  greedy; the teacher's completions decoded alike, and every check names the decoding): none blank (no letter or
  digit at all), none looping (share of repeated word n-grams in each completion, seq-rep-n of Welleck et al.
  2019), and a vocabulary not far below the teacher's on the same prompts (distinct-2, Li et al. 2016); each compared with the teacher where the teacher's own
  output sets the bar;
- whether the teacher finds them plausible: its bits per byte on the student's completions, pooled, against
  its own completions of the same prompts (`eval.ship.max_teacher_bits_ratio`): word salad that neither loops nor
  repeats a phrase passes the checks above and fails this one;
- how much of the teacher it kept on held-out text: teacher ÷ student held-out loss per trained token
  (`eval.ship.min_heldout_retention`, default 0.9; both score the same tokens with one tokenizer, so this
  is the ratio of their bits per byte). A preset whose held-out split the teacher wrote itself (its own
  sampled answers) may set it to null: the teacher's loss on its own samples is low because it wrote them,
  and the out-of-domain check below, which always runs, carries retention;
- how much of the teacher it kept on text it did not train on: teacher ÷ student bits per byte on
  `eval.reference_text` (`eval.ship.min_reference_retention`, default 0.9). Always runs: a 24-layer SmolLM2
  student kept 0.94 in domain and answered "The capital of France is the city of the Holy, which is in the
  Holy, ..." (0.85 out of domain); a run without a reference text cannot be called shippable;
- the thresholds a preset sets (`eval.ship`): benchmark retention vs the teacher (e.g. bits per byte on
  another source's text) and the reverse KL on the student's own samples.
Fail-closed: a check whose inputs were not measured fails (no samples: not shippable), NaN fails.
`ship` needs every check to pass. Pure functions of the EvalReport, so `kdflow evidence verify` recomputes it.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from kd.config import ShipConfig
from kd.results import EvalReport, Falsifier, SampleGeneration, ShipVerdict
from kd.samples import decoding_of

OUTPUT_ID = "F-SHIP-OUTPUT-001"
REPETITION_ID = "F-SHIP-REPETITION-001"
DIVERSITY_ID = "F-SHIP-DIVERSITY-001"
HELDOUT_ID = "F-SHIP-HELDOUT-001"
REFERENCE_ID = "F-SHIP-REFERENCE-001"
RETENTION_ID = "F-SHIP-RETENTION-001"
ON_SAMPLE_ID = "F-SHIP-ONSAMPLE-001"
FLUENCY_ID = "F-SHIP-FLUENCY-001"
STUDENT, TEACHER = "student_after", "teacher"
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Words and punctuation marks, lower-cased: the unit of the repetition and diversity measures
    (tokenizer-free, so teacher and student are measured alike whatever their vocabularies)."""
    return _WORD.findall(text.lower())


def is_blank(text: str) -> bool:
    """No letter or digit: empty, whitespace, newlines, or punctuation only."""
    return not any(ch.isalnum() for ch in text)


def repetition(text: str, n: int) -> float:
    """seq-rep-n: 1 − distinct n-grams / n-grams of one completion (0 when it has fewer than n+1 words)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 0.0 if len(grams) < 2 else 1 - len(set(grams)) / len(grams)


def distinct(texts: list[str], n: int = 2) -> float:
    """distinct-n over all completions together: distinct n-grams / n-grams (NaN when there are none)."""
    grams = Counter(g for t in texts for g in zip(*(words(t)[i:] for i in range(n))))
    total = sum(grams.values())
    return len(grams) / total if total else float("nan")


def _completions(samples: list[SampleGeneration], model: str) -> list[str]:
    return [s.completions[model] for s in samples if model in s.completions]


def _fmt(x: float | None) -> str:
    return "None" if x is None else f"{x:.3g}"


def output_check(samples: list[SampleGeneration]) -> Falsifier:
    """F-SHIP-OUTPUT-001: completions were generated, and none of the student's is blank where the teacher's is not."""
    pairs = [(s, s.completions.get(STUDENT), s.completions.get(TEACHER)) for s in samples]
    blank = [s.prompt for s, after, teacher in pairs if after is not None and is_blank(after)
             and not (teacher is not None and is_blank(teacher))]
    measured = sum(after is not None for _, after, _ in pairs)
    ok = measured > 0 and not blank
    observed = ("no completions generated (eval.sample_max_new_tokens is 0, or no prompts): nothing shows what the "
                "student says" if measured == 0 else
                f"{len(blank)} of {measured} completions blank (no letter or digit)"
                + (f", e.g. for {blank[0][:60]!r}" if blank else ""))
    return Falsifier(id=OUTPUT_ID, claim=f"the student's completions ({decoding_of(samples)}) of the sample and "
                     "held-out prompts are generated and none is blank (empty, whitespace or punctuation only) where "
                     "the teacher's is not",
                     observed=observed, verdict="pass" if ok else "fail")


def repetition_check(samples: list[SampleGeneration], cfg: ShipConfig) -> Falsifier:
    """F-SHIP-REPETITION-001: no completion of the student's repeats n-grams more than max(limit, the teacher's
    completion of the same prompt). Per prompt, not on average: one answer that loops is a loop a user gets."""
    n = cfg.repetition_ngram
    rows = [(s.prompt, repetition(s.completions[STUDENT], n),
             max(cfg.max_repetition, repetition(s.completions[TEACHER], n) if TEACHER in s.completions else 0.0))
            for s in samples if STUDENT in s.completions]
    loops = [(prompt, rep, limit) for prompt, rep, limit in rows if rep > limit]
    ok = bool(rows) and not loops  # nothing generated fails
    if not rows:
        observed = "no completions generated"
    elif loops:
        prompt, rep, limit = max(loops, key=lambda r: r[1])
        observed = (f"{len(loops)} of {len(rows)} completions loop ({decoding_of(samples)}): seq-rep-{n} {rep:.3g} > "
                    f"limit {limit:.3g} "
                    f"for {prompt[:60]!r}")
    else:
        observed = (f"0 of {len(rows)} completions loop ({decoding_of(samples)}): worst seq-rep-{n} "
                    f"{max(r[1] for r in rows):.3g}")
    return Falsifier(id=REPETITION_ID, claim=f"no completion of the student's ({decoding_of(samples)}) repeats {n}-grams "
                     f"more than max(eval.ship.max_repetition={cfg.max_repetition:g}, the teacher's on the same prompt)",
                     observed=observed, verdict="pass" if ok else "fail")


def diversity_check(samples: list[SampleGeneration], cfg: ShipConfig) -> Falsifier:
    """F-SHIP-DIVERSITY-001: the student's distinct-2 ≥ eval.ship.min_distinct_ratio × the teacher's."""
    teacher = _completions(samples, TEACHER)
    s, t = distinct(_completions(samples, STUDENT)), distinct(teacher)
    # a teacher whose completions have no two consecutive words sets no bar; one with no completions at all
    # (not generated, e.g. across tokenizers) leaves the check unmeasured, and an unmeasured check fails
    limit = cfg.min_distinct_ratio * t if not math.isnan(t) else (0.0 if teacher else float("nan"))
    ok = s >= limit  # NaN (the student produced no two consecutive words, or no teacher to compare) fails
    return Falsifier(id=DIVERSITY_ID, claim=f"the student's distinct-2 over its completions is ≥ "
                     f"eval.ship.min_distinct_ratio={cfg.min_distinct_ratio:g} × the teacher's",
                     observed=f"student {_fmt(s)}, teacher {_fmt(t)}, limit {_fmt(limit)}"
                     + ("" if ok else ": far fewer distinct phrases than the teacher"), verdict="pass" if ok else "fail")


def heldout_check(report: EvalReport, cfg: ShipConfig) -> Falsifier:
    """F-SHIP-HELDOUT-001: teacher ÷ student-after held-out loss ≥ eval.ship.min_heldout_retention."""
    t, a = report.teacher.loss, report.student_after.loss
    kept = t / a if a > 0 else float("nan")
    ok = kept >= cfg.min_heldout_retention  # NaN fails
    return Falsifier(id=HELDOUT_ID, claim=f"the student keeps ≥ eval.ship.min_heldout_retention="
                     f"{cfg.min_heldout_retention:g} of the teacher on held-out text (teacher ÷ student loss per token)",
                     observed=f"retention {_fmt(kept)} (teacher loss {_fmt(t)}, student-after {_fmt(a)}, "
                     f"student-before {_fmt(report.student_before.loss)})", verdict="pass" if ok else "fail")


def reference_check(report: EvalReport, cfg: ShipConfig) -> Falsifier:
    """F-SHIP-REFERENCE-001: teacher ÷ student-after bits per byte on eval.reference_text ≥ min_reference_retention."""
    r = report.reference
    ok = r is not None and r.retention >= cfg.min_reference_retention  # NaN fails
    observed = ("not measured (eval.reference_text is null): nothing shows what the student kept out of domain"
                if r is None else f"retention {_fmt(r.retention)} (teacher {_fmt(r.teacher_bits_per_byte)}, student-after "
                f"{_fmt(r.student_bits_per_byte)} bits/byte over {r.documents} documents, {r.bytes} bytes)")
    return Falsifier(id=REFERENCE_ID, claim=f"the student keeps ≥ eval.ship.min_reference_retention="
                     f"{cfg.min_reference_retention:g} of the teacher on text it did not train on (eval.reference_text: "
                     "teacher ÷ student bits per byte)", observed=observed, verdict="pass" if ok else "fail")


def retention_check(report: EvalReport, cfg: ShipConfig) -> Falsifier:
    """F-SHIP-RETENTION-001: every `eval.ship.min_retention` entry ("task/metric": r) has retention ≥ r."""
    scores = {f"{s.task}/{s.metric}": s.retention for s in (report.benchmarks.scores if report.benchmarks else [])}
    parts, ok = [], True
    for key, want in sorted(cfg.min_retention.items()):
        got = scores.get(key)
        good = got is not None and got >= want
        ok &= good
        parts.append(f"{key} {'not measured' if got is None else _fmt(got)} {'≥' if good else '<'} {want:g}")
    return Falsifier(id=RETENTION_ID, claim="benchmark retention vs the teacher (after ÷ teacher; teacher ÷ after when "
                     "lower is better) meets eval.ship.min_retention", observed="; ".join(parts),
                     verdict="pass" if ok else "fail")


def on_sample_check(report: EvalReport, cfg: ShipConfig) -> Falsifier:
    """F-SHIP-ONSAMPLE-001: reverse KL to the teacher on the student's own samples ≤ eval.ship.max_on_sample_reverse_kl."""
    r = report.on_samples
    got = r.after.reverse_kl if r is not None and r.after.tokens > 0 else None
    ok = got is not None and got <= cfg.max_on_sample_reverse_kl
    return Falsifier(id=ON_SAMPLE_ID, claim=f"KL(student‖teacher) per token on the student's own samples ≤ "
                     f"eval.ship.max_on_sample_reverse_kl={cfg.max_on_sample_reverse_kl:g}",
                     observed="not measured (eval.on_sample_prompts is 0)" if got is None else f"{_fmt(got)}",
                     verdict="pass" if ok else "fail")


def teacher_bits_per_byte(samples: list[SampleGeneration], model: str) -> float:
    """The teacher's bits on `model`'s completions per UTF-8 byte of them, pooled over prompts (NaN: none scored)."""
    scored = [(s.teacher_bits[model], len(s.completions[model].encode("utf-8"))) for s in samples
              if model in s.teacher_bits and model in s.completions]
    total = sum(b for _, b in scored)
    return sum(bits for bits, _ in scored) / total if total else float("nan")


def fluency_check(samples: list[SampleGeneration], cfg: ShipConfig) -> Falsifier:
    """F-SHIP-FLUENCY-001: the teacher reads the student's completions at ≤ max_teacher_bits_ratio × the bits per
    byte of its own. Blank, loop and distinct-n checks pass word salad that does not repeat itself; the teacher's
    surprise at every token does not. Unmeasured (no teacher scores, e.g. across tokenizers) fails."""
    s, t = teacher_bits_per_byte(samples, STUDENT), teacher_bits_per_byte(samples, TEACHER)
    limit = cfg.max_teacher_bits_ratio * t
    ok = s <= limit  # NaN (nothing scored) fails
    return Falsifier(id=FLUENCY_ID, claim=f"the teacher reads the student's completions ({decoding_of(samples)}) at ≤ "
                     f"eval.ship.max_teacher_bits_ratio={cfg.max_teacher_bits_ratio:g} × the bits per byte of its own "
                     "completions of the same prompts",
                     observed=f"teacher's bits/byte on the student's {_fmt(s)}, on its own {_fmt(t)}, limit {_fmt(limit)}"
                     + ("" if ok else ": text the teacher finds implausible" if not math.isnan(s) else
                        ": not measured (the teacher did not score the completions)"),
                     verdict="pass" if ok else "fail")


def ship_verdict(report: EvalReport, cfg: ShipConfig) -> ShipVerdict:
    """Every ship check for `report` under `cfg`; `ship` only when all pass."""
    samples = list(report.samples)
    checks = [output_check(samples), repetition_check(samples, cfg), diversity_check(samples, cfg),
              fluency_check(samples, cfg)]
    if cfg.min_heldout_retention is not None:
        checks.append(heldout_check(report, cfg))
    checks.append(reference_check(report, cfg))
    if cfg.min_retention:
        checks.append(retention_check(report, cfg))
    if cfg.max_on_sample_reverse_kl is not None:
        checks.append(on_sample_check(report, cfg))
    failed = [f"{c.id}: {c.observed}" for c in checks if c.verdict != "pass"]
    return ShipVerdict(verdict="dont_ship" if failed else "ship", checks=checks, reasons=failed)


def ship_line(verdict: ShipVerdict | None) -> str:
    """One line for logs, alerts and `evidence show`: SHIP, or DON'T SHIP and the first reason."""
    if verdict is None:
        return "ship verdict: not computed (no eval)"
    if verdict.verdict == "ship":
        return f"ship verdict: SHIP ({len(verdict.checks)} checks passed)"
    return f"ship verdict: DON'T SHIP: {verdict.reasons[0]}" + (
        f" (+{len(verdict.reasons) - 1} more)" if len(verdict.reasons) > 1 else "")
