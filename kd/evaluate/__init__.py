"""The `evaluate` step: held-out metrics (heldout.py), the students on their own samples (on_samples.py), gates
(gates.py), the step itself (step.py)."""

from kd.evaluate.gates import (COLLAPSE_ID, FINITE_ID, KL_ID, ON_SAMPLE_ID, UNIFORM_ID, collapse_gate, eval_gates,
                               finite_gate, kl_gate, on_sample_gate, uniform_gate)
from kd.evaluate.heldout import evaluate_model
from kd.evaluate.step import evaluate_run

__all__ = ["COLLAPSE_ID", "FINITE_ID", "KL_ID", "ON_SAMPLE_ID", "UNIFORM_ID", "collapse_gate", "eval_gates",
           "evaluate_model", "evaluate_run", "finite_gate", "kl_gate", "on_sample_gate", "uniform_gate"]
