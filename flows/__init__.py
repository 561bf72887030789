"""Prefect flows: `distill` (the whole DAG) and `kd-train` (training alone, for the GPU work pool)."""
