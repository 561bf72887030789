"""How numbers read on the run page (tasks/artifacts.py) and what `make up`'s health check calls a traceback."""

from __future__ import annotations

import math

from flows.health import tracebacks
from tasks.artifacts import duration, progress_text, sig, size, sparkline, step_line


def test_numbers_have_four_significant_figures():
    assert sig(3.14159265) == "3.142"
    assert sig(0.000123456) == "0.0001235"
    assert sig(12345.678) == "1.235e+04"
    assert sig(151936) == "151,936"  # counts exactly
    assert sig(math.nan) == "nan" and sig(None) == "–"


def test_sizes_in_mb_and_gb():
    assert size(411_100) == "411.1 KB"
    assert size(1_613_000) == "1.613 MB"
    assert size(15_231_000_000) == "15.23 GB"


def test_progress_description_has_step_loss_speed_and_eta():
    row = {"step": 10, "total_steps": 40, "loss": 3.14159, "tokens_per_s": 12345.6}
    text = progress_text(row, elapsed_s=20.0, first_step=0)  # 2 s a step, 30 steps to go
    assert text == "step 10/40 · loss 3.142 · 1.235e+04 tok/s · ETA 1m00s"
    assert duration(3725) == "1h02m"


def test_step_line_and_sparkline():
    row = {"step": 3, "total_steps": 40, "loss": 2.5, "ce": 2.0, "kd": 0.12345, "lr": 0.002, "grad_norm": 1.0,
           "tokens_per_s": 500.0}
    assert step_line(row) == "step 3/40 loss=2.5 ce=2 kd=0.1235 lr=0.002 grad_norm=1 tok/s=500"
    line = sparkline([5.0, 4.0, 3.0, 2.0, 1.0])
    assert len(line) == 5 and line[0] == "█" and line[-1] == "▁"


def test_health_check_finds_each_traceback_with_its_exception_line():
    log = ("INFO started\nTraceback (most recent call last):\n  File \"a.py\", line 1, in f\n"
           "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement\nINFO next pass\n")
    (tb,) = tracebacks(log)
    assert tb.splitlines()[-1].startswith("sqlalchemy.exc.InvalidRequestError")
    assert tracebacks("INFO all good\n") == []
