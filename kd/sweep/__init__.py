"""Sweeps: many distillations of one base run, ranked on one objective (issue 18).

spec.py: the sweep spec and its expansion into trials; report.py: the trial table, ranking, plot,
the sweep manifest (evidence/<sweep>/sweep.json) and its verification. Pure core: no prefect.
"""
