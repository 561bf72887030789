"""Human views of evidence folders: `kdflow evidence show RUN_DIR` and `kdflow evidence diff A B`.

    print(show_run(Path("evidence/run-1")))
    print(diff_runs(Path("evidence/run-1"), Path("evidence/run-2")))

Both read manifest.json through kd.evidence.manifest.load_manifest (EvidenceError when it is missing,
EvidenceInvalid when it does not validate). `show` never prints a PASS that verification refutes:
the status line and each falsifier are shown as the recorded numbers give them (kd/evidence/verdicts.py).
"""

from __future__ import annotations

from pathlib import Path

from kd.config import EvalConfig
from kd.evaluate.ship import ship_line, ship_verdict
from kd.evidence.manifest import Manifest, load_manifest
from kd.evidence.verify import recomputed_verdicts, verify_run_dir


def _g(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _eval_rows(m: Manifest) -> dict[str, dict]:
    if m.eval is None:
        return {}
    rows = {"teacher": m.eval.teacher, "student_before": m.eval.student_before, "student_after": m.eval.student_after}
    if m.eval.control is not None:  # the fine-tuning control (alpha = 1), same table
        rows["control"] = m.eval.control.control
    return {k: v.model_dump() for k, v in rows.items()}


def _control_lines(m: Manifest) -> list[str]:
    """KD − fine-tuning control per source and metric, with the paired bootstrap interval (issue 27)."""
    c = m.eval.control if m.eval is not None else None
    if c is None:
        return []
    out = [f"  distillation vs fine-tuning control (KD − control, {c.confidence:.0%} paired bootstrap over documents; "
           f"< 0: KD better; decided on {c.value_source}):"]
    for src, diffs in c.differences.items():
        out += [f"    {src:<10}{d.metric:<16} KD {d.kd:.4f} ± {d.kd_stderr:.4f}  control {d.control:.4f} ± "
                f"{d.control_stderr:.4f}  diff {d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}]  {d.documents} docs"
                for d in diffs]
    return out


def _benchmark_lines(m: Manifest) -> list[str]:
    """lm-eval benchmarks (issue 20): one row per task metric, teacher / before / after / retention."""
    b = m.eval.benchmarks if m.eval is not None else None
    if b is None:
        return []
    from kd.evaluate.benchmarks import domain_line

    docs = {t.task: t.n_docs for t in b.tasks}
    w = max([18] + [len(s.task) + 2 for s in b.scores])
    out = [f"  benchmarks (lm-eval {b.lm_eval_version}, {b.wall_s.get('total', 0):.1f} s; retention = after/teacher, "
           "teacher/after when lower is better; ± = standard error of after)",
           f"  {'task':<{w}}{'metric':<18}{'teacher':>11}{'before':>11}{'after':>11}{'±':>10}{'retention':>11}{'docs':>6}"]
    for s in b.scores:
        v = s.values
        out.append(f"  {s.task:<{w}}{s.metric + (' ↑' if s.higher_is_better else ' ↓'):<18}"
                   f"{_g(v.get('teacher')):>11}{_g(v.get('student_before')):>11}{_g(v.get('student_after')):>11}"
                   f"{_g(s.stderr.get('student_after')):>10}{_g(s.retention):>11}{docs.get(s.task, '?'):>6}")
    if line := domain_line(b):  # specialisation (in-domain) and retention (out-of-domain) side by side
        out.append(f"  {line}")
    return out


def _ship_lines(m: Manifest) -> list[str]:
    """The ship verdict as the recorded completions and numbers give it (kd/evaluate/ship.py), each check below."""
    ship = m.eval.ship if m.eval is not None else None
    if ship is None:
        return ["  ship verdict: not computed (no eval, or a run from before the ship verdict)"]
    try:
        again = ship_verdict(m.eval, EvalConfig.model_validate((m.config or {}).get("eval") or {}).ship)
    except (ValueError, TypeError):
        again = ship
    forged = f" (the manifest claims {ship.verdict})" if again.verdict != ship.verdict else ""
    out = [f"  {ship_line(again)}{forged}"]
    out += [f"    [{c.verdict.upper():4}] {c.id}: {c.observed}" for c in again.checks]
    return out


def show_run(run_dir: Path) -> str:
    """A readable summary of one run folder (status, models, training, eval table, falsifiers, integrity)."""
    m = load_manifest(run_dir)
    r, t = m.run, m.training
    problems = verify_run_dir(run_dir)
    recomputed = recomputed_verdicts(m)
    status = r.status.upper() if not problems else (
        f"FAIL (the manifest claims {r.status}, but it does not verify: {len(problems)} problem(s) below)")
    out = [
        f"run {r.name}: {status}   {r.start.isoformat()} → {r.end.isoformat()}",
        f"  flow run: {r.flow_run_id or '-'} {r.flow_run_url or ''}".rstrip(),
        f"  code {m.code.git_commit[:12]}{' (dirty)' if m.code.dirty else ''}, torch {m.environment.torch}, "
        f"device {m.environment.device}",
    ]
    for role in ("teacher", "student"):
        s = getattr(m.models, role)
        if s is not None:
            out.append(f"  {role}: {s.repo}@{s.revision} ({s.resolved_commit[:12]}, {s.total_bytes / 1e6:.1f} MB)")
    if m.vocab is not None:
        out.append(f"  vocab: {m.vocab.verdict}, rows kept {m.vocab.rows_kept}, valid {m.vocab.valid_vocab}")
    if t is not None:
        out.append(f"  training: {t.steps} steps, {t.tokens} tokens, loss {_g(t.initial_loss)} → {_g(t.final_loss)}, "
                   f"{t.tokens_per_s:.0f} tok/s, {t.wall_s:.1f} s, peak {t.peak_memory_bytes / 2**20:.0f} MiB")
    op = getattr(t, "on_policy", None) if t is not None else None
    if op:  # issue 17: what the policy was and what it generated
        st, b = op["settings"], op["batches"]
        out.append(f"  on-policy: fraction {st['fraction']:g}{' + seq_kd' if st['seq_kd'] else ''}, {st['divergence']} "
                   f"at T={st['loss_temperature']:g}; batches on/off/seq_kd {b['on_policy']}/{b['off_policy']}/"
                   f"{b['seq_kd']}; {op['samples']} samples, {op['generated_tokens']} tokens generated at "
                   f"{op['gen_tokens_per_s']:.1f} tok/s, {100 * op['gen_share']:.0f}% of step time")
    if m.checkpoint is not None:
        out.append(f"  checkpoint: {m.checkpoint.path} (sha256 {m.checkpoint.sha256[:12]}…)")
    rows = _eval_rows(m)
    if rows:
        cols = {"loss": "loss", "perplexity": "ppl", "kl_to_teacher": "KL(t||m)", "top1_agreement": "top1 agree",
                "entropy": "entropy", "top_token_share": "top share", "tokens": "tokens"}
        if getattr(m.eval, "cross_tokenizer", False):  # no shared vocabulary: bytes and byte-aligned groups instead
            cols = {"loss": "loss", "bits_per_byte": "bits/byte", "group_kl_to_teacher": "group KL",
                    "group_top1_agreement": "grp agree", "groups": "groups", "entropy": "entropy", "tokens": "tokens"}
            if any(r.get("turn_ends") for r in rows.values()):  # chat: where assistant turns end, across templates
                cols.update({"end_of_turn_kl": "EOT KL", "end_of_turn_gap": "EOT |dp|", "turn_ends": "turn ends"})
        out.append(f"  {'eval':<15}" + "".join(f"{label:>11}" for label in cols.values()))
        out += [f"  {name:<15}" + "".join(f"{_g(row[c]):>11}" for c in cols) for name, row in rows.items()]
    sampled = getattr(m.eval, "on_samples", None) if m.eval is not None else None
    if sampled is not None:  # issue 17: each student on its own seeded samples of held-out prompts
        out.append(f"  on own samples ({sampled.prompts} held-out prompts, T=1, <= {sampled.max_new_tokens} new tokens, "
                   f"seed {sampled.seed}):")
        for name in ("before", "after"):
            e = getattr(sampled, name)
            out.append(f"    student-{name:<7} reverse KL {_g(e.reverse_kl):>9}  teacher NLL {_g(e.teacher_nll):>9}  "
                       f"tokens {e.tokens}, stopped at EOS {e.stopped}/{e.samples}")
    out += _benchmark_lines(m)
    out += _control_lines(m)
    out += _ship_lines(m)
    out.append("  falsifiers:")
    for f in m.falsifiers:
        verdict = recomputed.get(f.id, f.verdict)
        forged = f" (the manifest claims {f.verdict})" if verdict != f.verdict else ""
        out.append(f"    [{verdict.upper():4}] {f.id}: {f.claim} — {f.observed}{forged}")
    for step, lin in m.lineage.items():
        if lin.cached:
            out.append(f"  {step}: reused from cache, produced by run {lin.produced_by_run or '?'}")
    out += [f"  note: {n}" for n in m.notes]
    out.append(f"  integrity: {len(m.files)} files, " + ("all sha256 match" if not problems else "PROBLEMS:"))
    out += [f"    {p}" for p in problems]
    return "\n".join(out)


def _flatten(d, prefix="") -> dict[str, object]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _metrics(m: Manifest) -> dict[str, object]:
    out: dict[str, object] = {"run.status": m.run.status}
    if m.training is not None:
        for k in ("steps", "tokens", "initial_loss", "final_loss", "tokens_per_s", "wall_s", "peak_memory_bytes"):
            out[f"training.{k}"] = getattr(m.training, k)
    for name, row in _eval_rows(m).items():
        out.update({f"eval.{name}.{k}": v for k, v in row.items()})
    sampled = getattr(m.eval, "on_samples", None) if m.eval is not None else None
    if sampled is not None:
        for name in ("before", "after"):
            out.update({f"eval.on_samples.{name}.{k}": v for k, v in getattr(sampled, name).model_dump().items()})
    if m.eval is not None and m.eval.benchmarks is not None:
        for sc in m.eval.benchmarks.scores:
            out.update({f"benchmarks.{sc.task}.{sc.metric}.{k}": v for k, v in sc.values.items()})
    out.update({f"falsifier.{f.id}": f.verdict for f in m.falsifiers})
    if m.eval is not None and m.eval.ship is not None:
        out["ship"] = m.eval.ship.verdict
    for role in ("teacher", "student"):
        s = getattr(m.models, role)
        if s is not None:
            out[f"models.{role}"] = f"{s.repo}@{s.resolved_commit[:12]}/{s.content_hash[:12]}"
    return out


def diff_runs(a: Path, b: Path) -> str:
    """Config and metric differences between two run folders, one `key: a → b` line each."""
    ma, mb = load_manifest(a), load_manifest(b)
    out = [f"A = {Path(a)} ({ma.run.name}), B = {Path(b)} ({mb.run.name})"]
    for title, da, db in (("config", _flatten(ma.config), _flatten(mb.config)), ("metrics", _metrics(ma), _metrics(mb))):
        keys = [k for k in sorted(set(da) | set(db)) if da.get(k, "<absent>") != db.get(k, "<absent>")
                and not (isinstance(da.get(k), float) and da.get(k) != da.get(k) and db.get(k) != db.get(k))]
        out.append(f"{title}: " + ("no differences" if not keys else f"{len(keys)} differ"))
        out += [f"  {k}: {_g(da.get(k, '<absent>'))} → {_g(db.get(k, '<absent>'))}" for k in keys]
    return "\n".join(out)
