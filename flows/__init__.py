"""Prefect flows: `distill` (the whole DAG) and `kd-train` (training alone, for the GPU work pool)."""

import kd  # noqa: E402,F401 - sets the OpenMP wait policy before anything here loads torch
