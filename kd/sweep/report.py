"""The sweep's page and its manifest: one row per trial read from the trial's evidence, the ranking,
the objective-vs-cost plot and `evidence/<sweep>/sweep.json`.

    rows = [trial_row(sweep_dir / t.name, t.name, t.overrides, objective) for t in trials]
    write_sweep(sweep_dir, spec_dump, objective, rows, ...)   # sweep.json + objective_vs_cost.png
    problems = verify_sweep_dir(sweep_dir)   # kd/evidence/verify.py: [] when every trial and the ranking check out

Every number in a row is read from the trial's own manifest.json (whose sha256 the sweep manifest
records), so `verify_sweep_dir` can recompute each row, the ranking and the best trial from the
trial folders alone.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from kd.hashing import sha256_file

SWEEP_MANIFEST = "sweep.json"
PLOT = "objective_vs_cost.png"
SUMMARY = "summary.md"
KIND = "sweep"
ATTEMPTS = ".attempts"  # earlier failed attempts of a trial are moved here before it runs again


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def benchmarks_of(manifest: dict) -> dict[str, float]:
    """The trained student's lm-eval scores when the run recorded any (eval.benchmarks, kd/results.py
    BenchmarkReport): {"<task>.<metric>": student_after value}."""
    report = _get(manifest, "eval.benchmarks")
    out: dict[str, float] = {}
    if isinstance(report, dict) and isinstance(report.get("scores"), list):
        for score in report["scores"]:
            if not isinstance(score, dict):
                continue
            value = _number((score.get("values") or {}).get("student_after"))
            if value is not None:
                out[f"{score.get('task')}.{score.get('metric')}"] = value
    return out


def _versus_control(manifest: dict) -> str | None:
    """eval.control: KD − fine-tuning control in bits per byte on the source F-DISTILL-VALUE-001 decides on,
    with its interval, e.g. `-0.031 [-0.045, -0.018]`; None without a control."""
    control = _get(manifest, "eval.control") or {}
    diffs = (control.get("differences") or {}).get(control.get("value_source"), [])
    d = next((x for x in diffs if x.get("metric") == "bits_per_byte"), None)
    if d is None:
        return None
    return f"{d['difference']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"


def objective_value(manifest: dict, metric_path: str) -> float | None:
    if metric_path.startswith("benchmarks."):  # benchmarks.<task>.<metric>, or benchmarks.<task> with one metric
        scores, want = benchmarks_of(manifest), metric_path.removeprefix("benchmarks.")
        if want in scores:
            return scores[want]
        hits = [v for k, v in scores.items() if k.rsplit(".", 1)[0] == want]
        return hits[0] if len(hits) == 1 else None
    return _number(_get(manifest, metric_path))


def trial_row(trial_dir: Path, name: str, overrides: dict, metric_path: str) -> dict:
    """The trial's row, from its manifest; status `missing` when it wrote none (crashed before evidence)."""
    row: dict[str, Any] = {"name": name, "overrides": overrides, "status": "missing", "objective": None}
    mpath = Path(trial_dir) / "manifest.json"
    if not mpath.is_file():
        return row
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {**row, "status": "unreadable"}
    run, training = m.get("run") or {}, m.get("training") or {}
    wall = None
    try:
        wall = (datetime.fromisoformat(run["end"]) - datetime.fromisoformat(run["start"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        pass
    row.update(
        status=run.get("status", "unreadable"), objective=objective_value(m, metric_path),
        kl=_number(_get(m, "eval.student_after.kl_to_teacher")),
        top1=_number(_get(m, "eval.student_after.top1_agreement")),
        ship=_get(m, "eval.ship.verdict"), versus_control=_versus_control(m),
        benchmarks=benchmarks_of(m), tokens_per_s=_number(training.get("tokens_per_s")),
        train_wall_s=_number(training.get("wall_s")), train_tokens=training.get("tokens"), wall_s=wall,
        flow_run_id=run.get("flow_run_id"), flow_run_url=run.get("flow_run_url"),
        manifest_sha256=sha256_file(mpath),
    )
    return row


def rank(rows: list[dict], direction: str) -> list[str]:
    """Trial names, best first: passing trials with an objective by it (ties by name), then the rest by name."""
    scored = [r for r in rows if r["status"] == "pass" and r.get("objective") is not None]
    sign = 1.0 if direction == "min" else -1.0
    ordered = sorted(scored, key=lambda r: (sign * r["objective"], r["name"]))
    rest = sorted((r for r in rows if r not in scored), key=lambda r: r["name"])
    return [r["name"] for r in ordered + rest]


def best_of(rows: list[dict], ranking: list[str]) -> str | None:
    by = {r["name"]: r for r in rows}
    top = by.get(ranking[0]) if ranking else None
    return top["name"] if top and top["status"] == "pass" and top.get("objective") is not None else None


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "–" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def plot_objective_vs_cost(rows: list[dict], ranking: list[str], metric: str, direction: str, out: Path,
                           title: str) -> Path:
    """Objective (y) against training wall time (x) of every trial that has both; the best one starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    best = best_of(rows, ranking)
    pts = [r for r in rows if r.get("objective") is not None and r.get("train_wall_s") is not None]
    for r in pts:
        ok = r["status"] == "pass"
        ax.scatter([r["train_wall_s"]], [r["objective"]], marker="*" if r["name"] == best else "o",
                   s=220 if r["name"] == best else 50, color="tab:orange" if r["name"] == best else
                   ("tab:blue" if ok else "tab:red"), zorder=3)
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r["overrides"].items())
        ax.annotate(label + ("" if ok else " (fail)"), (r["train_wall_s"], r["objective"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if not pts:
        ax.text(0.5, 0.5, "no trial has both an objective and a training time", ha="center", va="center",
                transform=ax.transAxes)
    missing = len(rows) - len(pts)
    ax.set_xlabel("training cost: training wall time (s)")
    ax.set_ylabel(f"{metric} ({'lower' if direction == 'min' else 'higher'} is better)")
    ax.set_title(title + (f"  [{missing} trial(s) without numbers]" if missing else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def summary_markdown(name: str, metric: str, direction: str, rows: list[dict], ranking: list[str],
                     plot_data_uri: str | None = None, sweep_dir: Path | None = None) -> str:
    """The sweep page: best trial, the table sorted by the objective, the plot."""
    by = {r["name"]: r for r in rows}
    best = best_of(rows, ranking)
    bench = sorted({b for r in rows for b in (r.get("benchmarks") or {})})
    failed = [r["name"] for r in rows if r["status"] != "pass"]
    # narrow enough for the Prefect UI beside its side panel: benchmarks get a table of their own below
    head = ["rank", "trial", "overrides", f"objective: {metric} ({direction})", "KL", "top-1", "tokens/s", "wall s",
            "pipeline", "ship", "KD − FT bits/byte"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bench_lines = ["| trial | " + " | ".join(bench) + " |", "|" + "---|" * (len(bench) + 1)] if bench else []
    for i, n in enumerate(ranking, 1):
        r = by[n]
        url = r.get("flow_run_url") or (f"/runs/flow-run/{r['flow_run_id']}" if r.get("flow_run_id") else None)
        link = f"[{n}]({url})" if url else f"`{n}`"  # no UI URL configured: the UI resolves the relative link
        ov = ", ".join(f"{k}={_fmt(v)}" for k, v in r["overrides"].items())
        status = r["status"].upper() if r["status"] != "pass" else "pass"
        if r.get("reused"):
            status += " (reused)"
        ship = {"ship": "SHIP", "dont_ship": "DON'T SHIP"}.get(r.get("ship"), "–")
        cells = [str(i), link, ov, _fmt(r.get("objective")), _fmt(r.get("kl")), _fmt(r.get("top1"), ".3f"),
                 _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("wall_s"), ".1f"), status, ship,
                 r.get("versus_control") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
        if bench:
            bench_lines.append(f"| `{n}` | " + " | ".join(_fmt((r.get("benchmarks") or {}).get(b)) for b in bench) + " |")
    verdict = f"**best trial: `{best}`** ({metric} = {_fmt(by[best]['objective'])})" if best else \
        "**no trial passed**: no best trial"
    md = [f"# Sweep {name}: {len(rows) - len(failed)}/{len(rows)} trials passed", "", verdict, ""]
    if failed:
        md += [f"Failed or missing: {', '.join(f'`{n}`' for n in failed)}", ""]
    md += lines
    if bench_lines:
        md += ["", "Benchmarks (lm-eval, student-after):", "", *bench_lines]
    if plot_data_uri:
        md += ["", f"![{metric} against training wall time]({plot_data_uri})"]
    if sweep_dir is not None:
        md += ["", f"Sweep folder: `{sweep_dir}` ({SWEEP_MANIFEST}, {PLOT}, one evidence folder per trial); "
               f"check it with `kdflow evidence verify {sweep_dir}`."]
    return "\n".join(md) + "\n"


def write_sweep(sweep_dir: Path, *, name: str, spec: dict, metric: str, direction: str, rows: list[dict],
                flow_run_id: str | None = None, flow_run_url: str | None = None, start: str | None = None,
                end: str | None = None, extra: dict | None = None) -> dict:
    """Write the plot, summary.md and sweep.json (which hashes every trial manifest and both files)."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ranking = rank(rows, direction)
    best = best_of(rows, ranking)
    plot_objective_vs_cost(rows, ranking, metric, direction, sweep_dir / PLOT, f"sweep {name}")
    (sweep_dir / SUMMARY).write_text(summary_markdown(name, metric, direction, rows, ranking, None, sweep_dir),
                                     encoding="utf-8")
    failed = [r["name"] for r in rows if r["status"] != "pass"]
    doc = {"kind": KIND, "name": name, "status": "fail" if failed else "pass", "failed": failed,
           "objective": {"metric": metric, "direction": direction}, "best": best, "ranking": ranking,
           "trials": rows, "spec": spec, "flow_run_id": flow_run_id, "flow_run_url": flow_run_url,
           "start": start, "end": end, **(extra or {}),
           "files": {PLOT: sha256_file(sweep_dir / PLOT), SUMMARY: sha256_file(sweep_dir / SUMMARY)}}
    tmp = sweep_dir / f".{SWEEP_MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(sweep_dir / SWEEP_MANIFEST)
    return doc
