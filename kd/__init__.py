"""kdflow's pure core: config, models, losses, training, eval and evidence. Never imports prefect."""

import os

__version__ = "0.1.0"

# OpenMP threads that sleep instead of spinning while they wait. On a 2-core machine shared with other
# work, spinning threads made the fused KD loss 4x slower (4.7 s PASSIVE vs 20 s ACTIVE, 11-49 s unset:
# bench/results/omp_wait_policy-*.json). libgomp reads the variable once, when torch loads, so it is set
# here, on the import of any kdflow module (every entry point, worker and torchrun rank imports `kd`
# before torch; ranks inherit it); a value the user set explicitly wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
