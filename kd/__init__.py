"""kdflow's pure core: config, models, losses, training, eval and evidence. Never imports prefect."""

import os

__version__ = "0.1.0"

# OpenMP threads that sleep instead of spinning while they wait. On a 2-core machine beside two CPU burners,
# kdflow's KD step (SmolLM2-135M shapes) ran 50 tokens/s with PASSIVE set here vs 22 with libgomp's default
# (median of 2 interleaved repeats: bench/busy_cpu_step.py, bench/results/busy_cpu_step-2026-12-02.json;
# ACTIVE was not measured on its own). libgomp reads the variable once, when torch loads, so it is set
# here, on the import of any kdflow module (every entry point, worker and torchrun rank imports `kd`
# before torch; ranks inherit it); a value the user set explicitly wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
