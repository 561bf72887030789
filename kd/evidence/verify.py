"""Verifying an evidence folder: integrity (schema, every sha256) and honesty (every verdict recomputed).

    problems = verify_run_dir(Path("evidence/run-1"))   # [] when intact; each problem names its file
                                                         # or falsifier
`kdflow evidence verify` prints these. A sweep's folder (`evidence/<sweep>/sweep.json`) is checked by
`verify_sweep_dir`: every trial folder, each row, the ranking. The verdicts are
recomputed by kd/evidence/verdicts.py, the functions that wrote them, from the numbers the manifest records
(eval.json must hold the same eval numbers; metrics.jsonl must end at training.steps).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from kd.config import EvalConfig
from kd.hashing import digest_of, sha256_file
from kd.evidence.manifest import (
    MANIFEST, SIG_FILE, EvidenceError, EvidenceInvalid, Manifest, dir_sha256, load_manifest, safe_rel,
)
from kd.evidence.redact import shorten
from kd.results import EvalReport
from kd.evaluate.ship import ship_verdict
from kd.evidence.verdicts import recompute_falsifiers, run_status
from kd.sweep.report import KIND, SWEEP_MANIFEST, best_of, rank, trial_row


def verify_run_dir(run_dir: Path) -> list[str]:
    """Problems with a run folder, each naming the file: the manifest must validate, every listed
    file must exist with its sha256, and no unlisted file may be present. [] means intact."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [f"{run_dir}: run folder not found"]
    if is_sweep_dir(run_dir):  # evidence/<sweep>/: every trial folder, each row, the ranking (verify_sweep_dir)
        return verify_sweep_dir(run_dir)
    try:
        m = load_manifest(run_dir)
    except (EvidenceError, EvidenceInvalid) as err:
        return [str(err).replace(str(run_dir / MANIFEST), MANIFEST)]
    problems = []
    for rel, want in sorted(m.files.items()):
        if not safe_rel(rel):
            problems.append(f"{rel}: path escapes the run folder")
            continue
        p = run_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif (got := sha256_file(p)) != want:
            problems.append(f"{rel}: sha256 mismatch (manifest {want[:12]}…, file {got[:12]}…)")
    on_disk = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    problems += [f"{rel}: extra file not listed in {MANIFEST}"
                 for rel in sorted(on_disk - set(m.files) - {MANIFEST, SIG_FILE})]
    if m.checkpoint is not None:
        if m.checkpoint.in_evidence:
            listed = {r[len("checkpoint/"):]: d for r, d in m.files.items() if r.startswith("checkpoint/")}
            if digest_of(listed) != m.checkpoint.sha256:
                problems.append("checkpoint: sha256 does not match the files listed under checkpoint/")
        elif Path(m.checkpoint.path).is_dir() and dir_sha256(Path(m.checkpoint.path)) != m.checkpoint.sha256:
            problems.append(f"checkpoint {m.checkpoint.path}: sha256 mismatch")
    reported = {p.split(":", 1)[0] for p in problems}  # a missing/changed file is named once, above
    return problems + recheck_verdicts(m, run_dir, skip_files=reported)


def _verdict_settings(m: Manifest) -> tuple[float, EvalConfig]:
    """kd.max_dropped_mass and the eval config the manifest records (what its verdicts used)."""
    cfg = m.config or {}
    return float((cfg.get("kd") or {}).get("max_dropped_mass", 0.01)), EvalConfig.model_validate(cfg.get("eval") or {})


def recheck_verdicts(m: Manifest, run_dir: Path, *, skip_files: set[str] = frozenset()) -> list[str]:
    """Disagreements between the recorded verdicts and the ones the recorded numbers give.

    eval.json must hold the manifest's eval numbers and metrics.jsonl must end at training.steps;
    then every falsifier is recomputed with kd.evidence.verdicts (the functions that wrote it) from
    training, vocab, eval and the recorded config, and so is the run status."""
    problems: list[str] = []
    eval_file = run_dir / "eval.json"
    if m.eval is not None and "eval.json" not in skip_files:
        if not eval_file.is_file():
            problems.append("eval.json: missing, but the manifest records an eval")
        else:
            try:
                on_disk = EvalReport.model_validate_json(eval_file.read_text(encoding="utf-8"))
                if on_disk.model_dump_json(exclude={"produced_by"}) != m.eval.model_dump_json(exclude={"produced_by"}):
                    problems.append("eval.json: its numbers differ from the manifest's eval")
            except (ValueError, UnicodeDecodeError) as err:
                problems.append(f"eval.json: unreadable ({shorten(str(err), 200)})")
    metrics = run_dir / "metrics.jsonl"
    if m.training is not None and metrics.is_file() and "metrics.jsonl" not in skip_files:
        try:
            rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
            last = rows[-1]["step"] if rows else None
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            last = "unreadable"
        trained = m.training.steps > m.training.resumed_from_step  # resumed at the last step: no new rows
        if (last is not None or trained) and last != m.training.steps:
            problems.append(f"metrics.jsonl: last step {last}, but training.steps is {m.training.steps}")
    try:
        max_dropped, eval_cfg = _verdict_settings(m)
    except (ValidationError, TypeError, ValueError, AttributeError) as err:
        return problems + [f"config: eval/kd settings unreadable, verdicts cannot be recomputed ({shorten(str(err), 200)})"]
    recorded = {f.id: f for f in m.falsifiers}
    for f in recompute_falsifiers(m.training, m.vocab, m.eval, max_dropped_mass=max_dropped, eval_cfg=eval_cfg):
        got = recorded.get(f.id)
        if got is None:
            problems.append(f"{f.id}: missing from the manifest; the recorded numbers say {f.verdict} ({f.observed})")
        elif got.verdict != f.verdict:
            problems.append(f"{f.id}: manifest says {got.verdict}, the recorded numbers say {f.verdict} "
                            f"({shorten(f.observed, 200)})")
    status = run_status(m.falsifiers, training=m.training, eval_report=m.eval, notes=m.notes)
    if status != m.run.status:
        problems.append(f"run.status: manifest says {m.run.status}, its falsifiers and notes say {status}")
    ship = m.eval.ship if m.eval is not None else None
    if ship is not None:  # the ship verdict, recomputed from the recorded completions and numbers
        again = ship_verdict(m.eval, eval_cfg.ship)
        if (again.verdict, [(c.id, c.verdict) for c in again.checks]) != (ship.verdict, [(c.id, c.verdict) for c in ship.checks]):
            said, found = {c.id: c.verdict for c in ship.checks}, {c.id: c.verdict for c in again.checks}
            differ = ", ".join(f"{i} {said.get(i)} -> {found.get(i)}" for i in {**said, **found}
                               if said.get(i) != found.get(i)) or "none, in another order"
            problems.append(f"eval.ship: manifest says {ship.verdict}, the recorded samples and numbers say "
                            f"{again.verdict} ({shorten('; '.join(again.reasons) or 'every check passes', 200)}); "
                            f"checks that differ: {differ}")
    return problems


def recomputed_verdicts(m: Manifest) -> dict[str, str]:
    """{falsifier id: verdict} recomputed from the recorded numbers (for `evidence show`)."""
    try:
        max_dropped, eval_cfg = _verdict_settings(m)
    except (ValidationError, TypeError, ValueError, AttributeError):
        return {}
    fs = recompute_falsifiers(m.training, m.vocab, m.eval, max_dropped_mass=max_dropped, eval_cfg=eval_cfg)
    return {f.id: f.verdict for f in fs}


# ---------------------------------------------------------------- a sweep's folder (kd/sweep/report.py writes it)
def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / SWEEP_MANIFEST).is_file() and not (Path(path) / "manifest.json").is_file()


_CHECKED = ("status", "objective", "kl", "top1", "tokens_per_s", "train_wall_s", "wall_s", "manifest_sha256")


def verify_sweep_dir(sweep_dir: Path) -> list[str]:
    """Problems with a sweep folder, each naming the trial or file: every trial folder verifies
    (kd.evidence.verify), its manifest's sha256 is the one recorded, each row's numbers are the ones its
    manifest gives, and the ranking, best trial and status are what those numbers give. [] = intact."""
    sweep_dir = Path(sweep_dir)
    try:
        doc = json.loads((sweep_dir / SWEEP_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return [f"{SWEEP_MANIFEST}: unreadable ({err})"]
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        return [f"{SWEEP_MANIFEST}: not a sweep manifest (kind {doc.get('kind') if isinstance(doc, dict) else None!r})"]
    problems: list[str] = []
    try:
        metric, direction = doc["objective"]["metric"], doc["objective"]["direction"]
        recorded = list(doc["trials"])
        names = [r["name"] for r in recorded]
    except (KeyError, TypeError) as err:
        return [f"{SWEEP_MANIFEST}: missing field {err}"]
    for rel, want in (doc.get("files") or {}).items():
        p = sweep_dir / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != want:
            problems.append(f"{rel}: sha256 mismatch")
    rows = []
    for r in recorded:
        n = r["name"]
        tdir = sweep_dir / n
        if Path(n).name != n or n.startswith("."):
            problems.append(f"trial {n!r}: not a folder name")
            continue
        fresh = trial_row(tdir, n, r.get("overrides") or {}, metric)
        if fresh["status"] != "missing":
            problems += [f"trial {n}: {p}" for p in verify_run_dir(tdir)]
        for k in _CHECKED:
            if fresh.get(k) != r.get(k):
                problems.append(f"trial {n}: {k} recorded as {r.get(k)!r}, its evidence says {fresh.get(k)!r}")
        rows.append(fresh)
    on_disk = {p.parent.name for p in sweep_dir.glob("*/manifest.json")}
    problems += [f"trial {n}: evidence folder not listed in {SWEEP_MANIFEST}" for n in sorted(on_disk - set(names))]
    ranking = rank(rows, direction)
    if doc.get("ranking") != ranking:
        problems.append(f"ranking: recorded {doc.get('ranking')}, the trials' {metric} ({direction}) gives {ranking}")
    if doc.get("best") != best_of(rows, ranking):
        problems.append(f"best: recorded {doc.get('best')!r}, the trials give {best_of(rows, ranking)!r}")
    status = "fail" if any(r["status"] != "pass" for r in rows) else "pass"
    if doc.get("status") != status:
        problems.append(f"status: recorded {doc.get('status')!r}, the trials give {status!r}")
    return problems
