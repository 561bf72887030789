"""The run page's artifacts and log lines: readable numbers, and the full set on every run.

A task served from Prefect's cache does not run its body, so it leaves no artifact; a cached run would
show 3 of the 8. `rebuild_cached` (called by write_evidence, which knows each step's lineage) recreates
the missing ones from the cached results, each saying which run produced it.

Numbers: 4 significant figures, sizes in MB/GB, counts with thousands separators. The loss curve is a
markdown artifact with the PNG embedded as a data: URI (Prefect 3.8's UI renders it on the artifact
page; checked by the screenshot test) plus a text sparkline that reads anywhere.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact

SPARK = "▁▂▃▄▅▆▇█"


def sig(x: float | int | None, digits: int = 4) -> str:
    """4 significant figures; ints exactly with separators; NaN/inf and None said as such."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def size(n: int | float | None) -> str:
    """Bytes as KB/MB/GB (decimal units, 4 significant figures)."""
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def reused(run: str | None) -> str:
    return f" (cached: reused from run {run})" if run else ""


def sparkline(values: list[float], width: int = 60) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:  # sample evenly, keep the last
        vals = [vals[round(i * (len(vals) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in vals)


def read_losses(metrics_path: str | Path) -> list[float]:
    path = Path(metrics_path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


# --- one function per artifact (the task calls it; rebuild_cached calls it again for a cached step)

def pull_files(teacher, student, reused_from: str | None = None) -> None:
    rows = []
    for s in (teacher, student):
        for f, h in sorted(s.files.items()):
            p = Path(s.local_dir) / f
            rows.append({"role": s.role, "repo": s.repo, "commit": s.resolved_commit, "file": f,
                         "size": size(p.stat().st_size) if p.is_file() else "–", "sha256": h})
        g = getattr(s, "gguf", None)
        if g is not None:
            rows.append({"role": s.role, "repo": s.repo, "commit": s.resolved_commit, "sha256": g.sha256, "size": "–",
                         "file": f"{g.file} (GGUF source: {g.quant_types}, dequantized to {g.dtype})"})
    create_table_artifact(key="pull-files", table=rows, description=(
        f"Every model file with its sha256 and the resolved commit: teacher {size(teacher.total_bytes)}, "
        f"student {size(student.total_bytes)}{reused(reused_from)}"))


def vocab_alignment(alignment, reused_from: str | None = None) -> None:
    rows = [{"field": k, "value": sig(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)}
            for k, v in alignment.identity().items() if k != "cross_tokenizer"]  # its own artifact
    create_table_artifact(key="vocab-alignment", table=rows,
                          description=f"Vocabulary alignment: {alignment.verdict}{reused(reused_from)}")


CROSS_ROWS = (("documents", "text pieces sampled"), ("groups", "aligned groups"),
              ("one_to_one_share", "share of one-to-one groups"), ("mean_teacher_group", "mean teacher tokens per group"),
              ("mean_student_group", "mean student tokens per group"),
              ("teacher_matched_mass_mean", "teacher probability on exactly matched ids (mean)"),
              ("teacher_not_round_trip", "pieces whose teacher tokens do not spell the text"),
              ("student_not_round_trip", "pieces whose student tokens do not spell the text"),
              ("bytes_not_round_trip", "bytes of pieces that do not round-trip"))


def cross_tokenizer_stats(stats: dict) -> None:
    """check_vocab's cross-tokenizer verdict: how the two tokenizations of the sampled text align."""
    rows = [{"statistic": label, "value": "n/a" if stats.get(k) is None else sig(stats[k])} for k, label in CROSS_ROWS]
    em = stats["exact_match"]
    rows.append({"statistic": "exact-match vocabulary share (teacher / student)",
                 "value": f"{sig(em['teacher_share'])} / {sig(em['student_share'])} ({em['matched']} pairs)"})
    create_table_artifact(key="vocab-cross-tokenizer", table=rows,
                          description="Cross-tokenizer alignment statistics on a sample of the training text")


TRAIN_ROWS = (("steps", sig), ("resumed_from_step", sig), ("tokens", sig), ("initial_loss", sig),
              ("final_loss", sig), ("tokens_per_s", sig), ("wall_s", duration), ("peak_memory_bytes", size),
              ("device", str), ("dtype", str), ("checkpoint_dir", str), ("checkpoint_sha256", str))


def train_metrics(result, reused_from: str | None = None) -> None:
    data = result.model_dump()
    rows = [{"metric": k, "value": fmt(data[k])} for k, fmt in TRAIN_ROWS if k in data]
    rows.append({"metric": "loss change", "value": sig(data["final_loss"] - data["initial_loss"])})
    create_table_artifact(key="train-metrics", table=rows, description="Training summary" + reused(reused_from))


def train_progress_done(result, reused_from: str | None = None) -> None:
    """A cached training: the progress artifact at 100 %, saying where the weights came from."""
    create_progress_artifact(progress=100.0, key="train-progress", description=(
        f"step {result.steps}/{result.steps} · loss {sig(result.final_loss)} · "
        f"{sig(result.tokens_per_s)} tok/s{reused(reused_from)}"))


def progress_text(row: dict, elapsed_s: float, first_step: int) -> str:
    """`step 12/40 · loss 3.142 · 1.25e+04 tok/s · ETA 0m14s` for the progress artifact's description."""
    done = row["step"] - first_step
    eta = elapsed_s / done * (row["total_steps"] - row["step"]) if done > 0 else None
    return (f"step {row['step']}/{row['total_steps']} · loss {sig(row['loss'])} · "
            f"{sig(row['tokens_per_s'])} tok/s{generation_text(row)} · ETA {duration(eta)}")


def generation_text(row: dict) -> str:
    """kd.on_policy runs: ` · generating 412 tok/s, 63% of the step` (empty otherwise)."""
    if "gen_s" not in row:
        return ""
    return f" · generating {sig(row['gen_tokens_per_s'])} tok/s, {100 * row['gen_share']:.0f}% of the step"


def step_line(row: dict) -> str:
    return (f"step {row['step']}/{row['total_steps']} loss={sig(row['loss'])} ce={sig(row['ce'])} "
            f"kd={sig(row['kd'])} lr={sig(row['lr'], 3)} grad_norm={sig(row['grad_norm'])} "
            f"tok/s={sig(row['tokens_per_s'])}" + (f" gen_tok/s={sig(row['gen_tokens_per_s'])} "
                                                   f"gen_share={row['gen_share']:.2f}" if "gen_s" in row else ""))


EVAL_COLUMNS = (("loss", "loss"), ("perplexity", "perplexity"), ("kl_to_teacher", "KL to teacher"),
                ("top1_agreement", "top-1 agreement"))


def eval_comparison(report, reused_from: str | None = None) -> None:
    """teacher / student-before / student-after, then `after − before` for each metric."""
    rows = []
    for name in ("teacher", "student_before", "student_after"):
        m = getattr(report, name)
        rows.append({"model": name.replace("_", "-"), **{k: _cell(getattr(m, k)) for k, _ in EVAL_COLUMNS},
                     "tokens": m.tokens})
    before, after = report.student_before, report.student_after
    delta = {k: _diff(getattr(after, k), getattr(before, k)) for k, _ in EVAL_COLUMNS}
    rows.append({"model": "after − before", **delta, "tokens": None})
    sampled = getattr(report, "on_samples", None)
    if sampled is not None:  # issue 17: each student on its own samples, scored by the teacher
        for name in ("before", "after"):
            e = getattr(sampled, name)
            rows.append({"model": f"student-{name} on own samples", "reverse KL to teacher": _cell(e.reverse_kl),
                         "teacher NLL": _cell(e.teacher_nll), "tokens": e.tokens})
        rows.append({"model": "on own samples: after − before",
                     "reverse KL to teacher": _diff(sampled.after.reverse_kl, sampled.before.reverse_kl),
                     "teacher NLL": _diff(sampled.after.teacher_nll, sampled.before.teacher_nll), "tokens": None})
        keys = list(dict.fromkeys(k for row in rows for k in row))
        rows = [{k: row.get(k) for k in keys} for row in rows]  # one column set for every row
    gates = ", ".join(f"{g.id}={g.verdict}" for g in report.gates)
    create_table_artifact(key="eval-comparison", table=rows,
                          description=f"Held-out metrics; gates: {gates}{reused(reused_from)}")


def control_table(control, reused_from: str | None = None) -> None:
    """eval.control: KD − fine-tuning control per source and metric, with the paired bootstrap interval."""
    rows = [{"source": src, "metric": d.metric, "KD": _cell(d.kd), "control": _cell(d.control),
             "KD − control": _cell(d.difference), "interval low": _cell(d.low), "interval high": _cell(d.high),
             "documents": d.documents} for src, diffs in control.differences.items() for d in diffs]
    create_table_artifact(key="control-comparison", table=rows,
                          description=f"Distillation vs fine-tuning (alpha = 1, same data, steps, lr, seed): KD − control, "
                          f"{control.confidence:.0%} paired bootstrap interval over documents (< 0: KD better); "
                          f"F-DISTILL-VALUE-001 decided on {control.value_source}{reused(reused_from)}")


def benchmarks_table(bench, reused_from: str | None = None) -> None:
    """lm-eval benchmarks: one row per task metric, teacher / before / after / retention (kd/evaluate/benchmarks.py)."""
    docs = {t.task: t.n_docs for t in bench.tasks}
    rows = [{"task": s.task, "metric": s.metric + (" ↑" if s.higher_is_better else " ↓"),
             "teacher": _cell(s.values.get("teacher")), "student-before": _cell(s.values.get("student_before")),
             "student-after": _cell(s.values.get("student_after")),
             "± (after)": _cell(s.stderr.get("student_after")), "retention": _cell(s.retention),
             "docs": docs.get(s.task)} for s in bench.scores]
    wall = bench.wall_s.get("total")
    create_table_artifact(key="benchmarks", table=rows,
                          description=f"lm-eval {bench.lm_eval_version} benchmarks ({duration(wall)}); retention = "
                          f"after ÷ teacher (teacher ÷ after when lower is better); ± = standard error"
                          + (f"; kdflow_bpb_reference: {bench.reference_text}, text the run did not train on"
                             if bench.reference_text else "") + reused(reused_from))


def _cell(x: float | None) -> float | str | None:
    """JSON numbers at 4 significant figures; a NaN/inf metric (a failing run) shown as text, not dropped."""
    if x is None:
        return None
    return float(f"{x:.4g}") if math.isfinite(x) else str(x)


def _diff(a: float | None, b: float | None) -> float | str | None:
    if a is None or b is None:
        return None
    return _cell(a - b)


def loss_curve(run_dir: Path, metrics_path: str | Path | None, run_name: str, reused_from: str | None = None) -> None:
    """The evidence folder's loss_curve.png on the run page, with a sparkline and the numbers."""
    losses = read_losses(metrics_path) if metrics_path else []
    png = Path(run_dir) / "loss_curve.png"
    parts = [f"# Loss curve\n\nRun `{run_name}`{reused(reused_from)}\n"]
    if losses:
        parts.append(f"`{sparkline(losses)}`  loss {sig(losses[0])} → {sig(losses[-1])} over {len(losses)} "
                     f"logged steps\n")
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"![training loss per step](data:image/png;base64,{data})\n")
    if len(parts) == 1:
        parts.append("No training metrics (the run stopped before training).\n")
    create_markdown_artifact(key="loss-curve", markdown="\n".join(parts),
                             description=f"Training loss per step ({png.name} in the evidence folder)")


def evidence_summary(manifest, run_name: str, run_dir: Path, signed: str = "") -> None:
    """Verdicts first and short (fits a 1600 px window); the observations, which can be long, below."""
    status = manifest.run.status.upper()
    rows = "\n".join(f"| **{f.verdict if f.verdict == 'pass' else f.verdict.upper()}** | `{f.id}` | {_short(f.claim, 70)} |"
                     for f in manifest.falsifiers)
    observed = "\n".join(f"- `{f.id}`: {_short(f.observed, 400)}" for f in manifest.falsifiers)
    lineage = getattr(manifest, "lineage", None) or {}
    reused_rows = "\n".join(f"| {step} | {'cached' if lin.cached else 'computed'} | {lin.produced_by_run or '–'} |"
                            for step, lin in lineage.items())
    ship = getattr(manifest.eval, "ship", None) if manifest.eval is not None else None
    ship_word = "not computed" if ship is None else "SHIP" if ship.verdict == "ship" else "DON'T SHIP"
    md = (f"# Run {run_name}: pipeline **{status}** · ship verdict **{ship_word}**\n\nEvidence folder: "
          f"`{run_dir}`{signed}\n\n| verdict | falsifier | claim |\n|---|---|---|\n{rows}\n\n")
    if ship is not None:  # kd/evaluate/ship.py: is the student worth deploying, from what it says
        md += "### Ship checks\n\n| verdict | check | observed |\n|---|---|---|\n" + "\n".join(
            f"| **{c.verdict if c.verdict == 'pass' else c.verdict.upper()}** | `{c.id}` | {_short(c.observed, 160)} |"
            for c in ship.checks) + "\n\n"
    md += f"### Observed\n\n{observed}\n"
    if reused_rows:
        md += f"\n### Where each result came from\n\n| step | | produced by run |\n|---|---|---|\n{reused_rows}\n"
    create_markdown_artifact(key="evidence-summary", markdown=md, description=f"Falsifier verdicts of {run_name}")


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def prepared_markdown(r) -> str:
    """The prepare_data step's artifact: counts, the document-length histogram, samples (a PreparedData)."""
    c = r.counts
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in c.items())
    hist = "\n".join(f"| {k} | {v:,} |" for k, v in r.length_histogram.items())
    skipped = ", ".join(f"{k}: {v}" for k, v in r.skipped.items()) or "none"
    samples = "\n\n".join(f"**Sample {i + 1}**\n\n```text\n{s.replace('```', '` ` `')}\n```"
                          for i, s in enumerate(r.samples))
    return (f"# Prepared data ({r.format}, seq_len {r.seq_len})\n\n`{r.path}`"
            f"{' (reused)' if r.reused else f' in {r.wall_s:.1f} s, {r.tokens_per_s:,.0f} tokens/s'}\n\n"
            f"| count | value |\n|---|---|\n{rows}\n\nSkipped records: {skipped}\n\n"
            f"| document tokens | documents |\n|---|---|\n{hist}\n\n"
            f"Text inside ⟦…⟧ carries no loss (prompt, system, user turns, segment starts).\n\n{samples}\n")


def layer_choice_artifact(student, reused_from: str | None = None) -> None:
    """A pruned student's layers and their measured scores (kd/layer_choice.py), as a markdown table."""
    if student.init is None:
        return
    from kd.layer_choice import choice_markdown

    create_markdown_artifact(key="layer-choice", markdown=choice_markdown(student.init.model_dump()),
                             description=f"Teacher layers the pruned student keeps, strategy {student.init.strategy}, "
                             f"with per-layer scores{reused(reused_from)}")


def rebuild_cached(lineage: dict, *, teacher=None, student=None, alignment=None, training=None,
                   evaluation=None, prepared=None) -> list[str]:
    """Recreate the artifacts of the steps this run took from the cache; returns the steps rebuilt.

    Which steps were cached and who produced each: the lineage (what the flow saw, tasks/lineage.py)."""
    done = []
    for step, lin in sorted((lineage or {}).items()):
        if not getattr(lin, "cached", False):
            continue
        src = lin.produced_by_run or "an earlier run (unknown)"
        if step == "pull_models" and teacher is not None and student is not None:
            pull_files(teacher, student, src)
            layer_choice_artifact(student, src)  # a pruned student's layer scores (issue 27)
        elif step == "check_vocab" and alignment is not None:
            vocab_alignment(alignment, src)
        elif step == "train_student" and training is not None:
            train_progress_done(training, src)
            train_metrics(training, src)
        elif step == "evaluate" and evaluation is not None:
            eval_comparison(evaluation, src)
            if getattr(evaluation, "control", None) is not None:  # the fine-tuning control (issue 27)
                control_table(evaluation.control, src)
            if getattr(evaluation, "benchmarks", None) is not None:  # lm-eval benchmarks (issue 20)
                benchmarks_table(evaluation.benchmarks, src)
            if getattr(evaluation, "samples", None):  # greedy completions (kd/samples.py), when eval made them
                from kd.samples import samples_markdown

                create_markdown_artifact(key="sample-generations", markdown=samples_markdown(evaluation.samples),
                                         description="Greedy completions: teacher, student-before, student-after"
                                         + reused(src))
        elif step == "prepare_data" and prepared is not None:
            create_markdown_artifact(key="prepared-data", markdown=prepared_markdown(prepared),
                                     description="Documents, tokens, skipped/truncated/dropped counts, samples"
                                     + reused(src))
        else:
            continue
        done.append(step)
    return done
