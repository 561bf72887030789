"""A sweep spec: one base run, the overrides that make its trials, and what ranks them.

    spec = load_spec("configs/sweeps/smoke-alpha-temperature.yaml")
    trials = expand(spec)      # [Trial(name="smoke-at-alpha0.1-temperature1", overrides={...}, config=RunConfig)]

Every trial is validated up front, with the machinery of `--set` (kd.config.apply_override then
RunConfig validation): an unknown field, a bad value or an empty grid is a ConfigError naming the
spec field (`grid.kd.alpha[2]`), so `kdflow sweep` exits 2 before any trial starts.
Trial names are deterministic: `<sweep>-<override-slug>` (`smoke-at-alpha0.3-temperature2`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd.config import RunConfig, apply_override, format_validation_error
from kd.errors import ConfigError, InputError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
# set by the sweep: trial names and folders are derived from the sweep's name and its evidence/work dirs
SWEEP_OWNED = ("name", "evidence_dir", "work_dir")
# shorthand objective names -> the manifest path they read (the trained student's held-out numbers)
METRIC_ALIASES = {"kl": "eval.student_after.kl_to_teacher", "top1": "eval.student_after.top1_agreement",
                  "loss": "eval.student_after.loss", "perplexity": "eval.student_after.perplexity"}
MAX_NAME = 100


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Objective(_Spec):
    """What ranks the trials: one number from each trial's evidence manifest, and its direction."""

    metric: str = Field(
        description="Manifest path of the number (any numeric field of manifest.json), e.g. "
        "eval.student_after.kl_to_teacher, eval.student_after.top1_agreement, eval.on_samples.after.reverse_kl, "
        "training.final_loss, benchmarks.<task>[.<metric>] (the trained student's "
        "lm-eval score, when eval.benchmarks lists tasks); "
        "or a shorthand: kl, top1, loss, perplexity (the trained student's held-out numbers).",
        min_length=1,
    )
    direction: Literal["min", "max"] = Field(description="min: lower is better (KL, loss); max: higher (top-1).")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        # any number manifest.json can hold (read off its schema: kd/sweep/metrics.py), or the benchmarks shorthand
        from kd.sweep.metrics import metric_problem

        path = metric_path(metric)
        parts = path.split(".")
        if len(parts) >= 2 and parts[0] == "benchmarks" and all(parts[1:]):
            return metric
        problem = metric_problem(path)
        if problem:
            raise ValueError(f"unknown metric {metric!r}: {problem}; use kl, top1, loss, perplexity, a numeric "
                             "manifest path (eval.student_after.kl_to_teacher, eval.on_samples.after.reverse_kl, "
                             "training.tokens_per_s, ...) or benchmarks.<task>[.<metric>]")
        return metric


class SweepSpec(_Spec):
    """A tuning campaign: a base run (a preset file or an inline config), the overrides that make its trials
    (a grid, a list, or both), the objective that ranks them, and how many run at once."""

    name: str = Field(description="Sweep name: evidence/<name>/ holds the sweep manifest and one folder per trial, "
                      "each named <name>-<overrides>.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=60)
    base: str | None = Field(None, min_length=1, description="Base preset file (e.g. configs/smoke.yaml), relative "
                             "to the working directory or the kdflow checkout. Give base or config.")
    config: dict[str, Any] | None = Field(None, description="Inline base RunConfig (instead of base).")
    set: list[str] = Field(default_factory=list, description="Overrides applied to every trial, as for `kdflow run "
                           "--set` (e.g. kd.teacher_mode=offline).")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="RunConfig field (dotted name, as for --set) -> values; the trials are "
        "every combination, in the order given.")
    trials: list[dict[str, Any]] = Field(
        default_factory=list, description="Explicit trials, each a map of dotted RunConfig field -> value "
        "(added after the grid's).")
    objective: Objective = Field(description="The number that ranks the trials and its direction.")
    evidence_dir: str | None = Field(None, min_length=1, description="Where evidence/<sweep>/ goes (None: the base "
                                     "config's evidence_dir).")
    work_dir: str | None = Field(None, min_length=1, description="Where runs/<sweep>/ goes (None: the base config's "
                                 "work_dir).")
    concurrency: int = Field(2, ge=1, le=64, description="Trials running at once (training still takes one GPU "
                             "slot each: orchestration.gpu_slots).")

    @model_validator(mode="after")
    def _shape(self) -> "SweepSpec":
        if (self.base is None) == (self.config is None):
            raise ValueError("give exactly one of base (a preset file) or config (an inline RunConfig)")
        return self


class Trial(BaseModel):
    """One trial: its name, the overrides that distinguish it, and its validated run config."""

    name: str
    overrides: dict[str, Any]
    config: RunConfig


def metric_path(metric: str) -> str:
    return METRIC_ALIASES.get(metric, metric)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def slug(overrides: dict[str, Any]) -> str:
    """`{"kd.alpha": 0.3, "kd.temperature": 2.0}` -> `alpha0.3-temperature2` (the last part of each name)."""
    parts = [f"{k.rsplit('.', 1)[-1]}{_fmt(v)}" for k, v in overrides.items()]
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)) if parts else "base"
    return text.strip("._") or "trial"


def trial_name(sweep: str, overrides: dict[str, Any]) -> str:
    name = f"{sweep}-{slug(overrides)}"
    if len(name) > MAX_NAME:  # still deterministic: a prefix and the overrides' hash
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec YAML; ConfigError (exit 2) naming the field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep spec not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"sweep spec {p} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {p} must hold a mapping, got {type(data).__name__}")
    return validate_spec(data, where=str(p))


def validate_spec(data: dict | SweepSpec, where: str = "sweep spec") -> SweepSpec:
    if isinstance(data, SweepSpec):
        return data
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {format_validation_error(err)}") from None


def _base_data(spec: SweepSpec) -> dict[str, Any]:
    if spec.config is not None:
        return json.loads(json.dumps(spec.config))  # a deep copy
    p = Path(spec.base).expanduser()
    for cand in (p, REPO_ROOT / p) if not p.is_absolute() else (p,):
        if cand.is_file():
            loaded = yaml.safe_load(cand.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"base: preset {cand} must hold a mapping")
            return loaded
    raise ConfigError(f"base: preset file not found: {spec.base}")


def _config(data: dict[str, Any], overrides: dict[str, Any], where: str) -> RunConfig:
    data = json.loads(json.dumps(data))
    for key, value in overrides.items():
        # the value is written as JSON, which --set's YAML parser reads back as the same value
        apply_override(data, f"{key}={json.dumps(value)}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {format_validation_error(err)}") from None


def _check_key(key: str, where: str) -> None:
    if not isinstance(key, str) or not key or not all(key.split(".")):
        raise ConfigError(f"{where}: expected a dotted RunConfig field name, got {key!r}")
    if key in SWEEP_OWNED:
        raise ConfigError(f"{where}: set by the sweep (trials are named <sweep>-<overrides> and kept under "
                          "<evidence_dir>/<sweep>/); it cannot be swept")


def expand(spec: SweepSpec) -> list[Trial]:
    """The trials, in order: the grid's combinations then the explicit list; each config validated."""
    base = _base_data(spec)
    raw = json.loads(json.dumps(base))
    for i, o in enumerate(spec.set):
        key = o.split("=", 1)[0].strip()
        _check_key(key, f"set[{i}] {key}")
        try:
            apply_override(base, o)
        except ConfigError as err:
            raise ConfigError(f"set[{i}]: {err}") from None
    try:
        _config(base, {}, "set")
    except ConfigError:  # name the base when it is wrong on its own, else the set: overrides
        _config(raw, {}, "base" if spec.base else "config")
        raise
    if not spec.grid and not spec.trials:
        raise ConfigError("grid: empty: give at least one field with values (or a list under trials)")
    combos: list[dict[str, Any]] = []
    for key, values in spec.grid.items():
        _check_key(key, f"grid.{key}")
        if not values:
            raise ConfigError(f"grid.{key}: empty list: give at least one value")
        for j, v in enumerate(values):  # each value alone first: the error names the value that is bad
            _config(base, {key: v}, f"grid.{key}[{j}]={v!r}")
    if spec.grid:
        keys = list(spec.grid)
        combos += [dict(zip(keys, vals)) for vals in itertools.product(*(spec.grid[k] for k in keys))]
    for i, t in enumerate(spec.trials):
        if not t:
            raise ConfigError(f"trials[{i}]: empty: give at least one field -> value")
        for key in t:
            _check_key(key, f"trials[{i}].{key}")
        combos.append(dict(t))
    evidence, work = (str(p) for p in _roots(spec, _config(base, {}, "base")))
    trials: list[Trial] = []
    seen: dict[str, int] = {}
    for i, overrides in enumerate(combos):
        name = trial_name(spec.name, overrides)
        where = f"grid trial {i} ({name})" if i < len(combos) - len(spec.trials) else \
            f"trials[{i - (len(combos) - len(spec.trials))}]"
        if name in seen:
            raise ConfigError(f"{where}: same overrides as trial {seen[name]} ({name})")
        seen[name] = i
        cfg = _config(base, {**overrides, "name": name, "evidence_dir": evidence, "work_dir": work}, where)
        trials.append(Trial(name=name, overrides=overrides, config=cfg))
    return trials


def _roots(spec: SweepSpec, base: RunConfig) -> tuple[Path, Path]:
    ev, work = spec.evidence_dir or base.evidence_dir, spec.work_dir or base.work_dir
    return (Path(ev).expanduser().resolve() / spec.name, Path(work).expanduser().resolve() / spec.name)


def sweep_dir(spec: SweepSpec) -> Path:
    """evidence/<sweep>/: the sweep manifest and one evidence folder per trial."""
    return _roots(spec, _config(_base_data(spec), {}, "base"))[0]


def preflight_trials(trials: list[Trial]) -> None:
    """Preflight every trial's own config before any trial runs: an override can break a trial in a way only
    its config shows (a resume folder, a device, a benchmark task), and sharing pulled models and data with
    other trials does not make it sound. Cheap: metadata and headers only, ~0.06 s a trial once imported.
    The first failing trial's InputError, named: `trial <name>: preflight failed: ...` (exit 2)."""
    from kd.preflight import raise_if_failed, run_preflight

    for t in trials:
        try:
            raise_if_failed(run_preflight(t.config))
        except InputError as err:
            raise type(err)(f"trial {t.name}: {err}") from None


def shared_inputs(cfg: RunConfig) -> str:
    """What the shared steps (pull, vocab check, prepared data, teacher cache) read from a config: trials
    with the same value need them once. Deliberately broad: an extra group costs one Cached task run."""
    t = cfg.train
    kd = cfg.kd.model_dump(mode="json", exclude={"alpha", "divergence", "jsd_beta", "chunk_size"})
    if cfg.kd.teacher_mode != "offline":
        kd.pop("temperature")  # only the offline teacher cache depends on it
    return json.dumps({"teacher": cfg.teacher.model_dump(mode="json"), "student": cfg.student.model_dump(mode="json"),
                       "data": cfg.data.model_dump(mode="json"), "kd": kd, "batch_size": t.batch_size,
                       "dtype": t.dtype, "device": t.device}, sort_keys=True)


def shared_groups(trials: list[Trial]) -> list[list[Trial]]:
    """Trials grouped by `shared_inputs`, in first-appearance order."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(shared_inputs(t.config), []).append(t)
    return list(groups.values())
