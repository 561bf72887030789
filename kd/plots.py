"""Training plots for the evidence folder.

    plot_loss_curve(Path("runs/x/metrics.jsonl"), Path("evidence/x/loss_curve.png"))

Uses matplotlib's object API with the Agg canvas directly (no pyplot): no display needed, no
global backend switch, safe in worker threads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# (metrics.jsonl key, legend label); `kd` is the already weighted/temperature-scaled KD term.
_SERIES = (("loss", "total loss"), ("ce", "CE (hard labels)"), ("kd", "KD term"))


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """Step records of a metrics.jsonl: lines with a `step` and a `loss`; blank or other lines skipped."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash must not hide the rest of the curve
        if isinstance(rec, dict) and "step" in rec and "loss" in rec:
            rows.append(rec)
    return rows


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan  # gaps in the line, not a crash


def plot_loss_curve(metrics_jsonl: Path, out_png: Path, *, title: str | None = None) -> Path:
    """Plot loss, CE and KD term per step from `metrics_jsonl` into `out_png` (PNG, 120 dpi).

    A file with no step records still gives a PNG that says so, so the evidence folder is complete.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(Path(metrics_jsonl))
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if rows:
        steps = [_num(r["step"]) for r in rows]
        for key, label in _SERIES:
            if any(key in r for r in rows):
                ax.plot(steps, [_num(r.get(key)) for r in rows], label=label, marker="." if len(rows) < 50 else None)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training metrics recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "KD training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
