"""One typed run configuration: `RunConfig` and its parts.

Defaults live only here. Presets in `configs/*.yaml` are instances of it:

    cfg = load_config("configs/smoke.yaml", ["kd.alpha=0.5", "train.steps=10"])

Validation errors are turned into `ConfigError` messages that name the field
(`kd.temperature: must be > 0, got -1`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd.errors import ConfigError

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelRef(_Part):
    """Where a model comes from: a hub repo at a revision, a local folder, or a generated tiny model."""

    repo: str = Field(
        description="Hub repo id (`Qwen/Qwen2.5-0.5B`), a local folder path, or `tiny:teacher` / "
        "`tiny:student` for the deterministic tiny models kdflow generates itself.",
        min_length=1,
    )
    revision: str = Field(
        "main",
        description="Hub branch, tag or 40-hex commit to pin. Ignored for local folders and tiny models.",
        min_length=1,
    )
    trust_remote_code: bool = Field(
        False, description="Allow the repo's own Python code to run when loading (off: security default)."
    )

    @property
    def kind(self) -> Literal["hub", "local", "tiny"]:
        if self.repo.startswith("tiny:"):
            return "tiny"
        if self.repo.startswith(("/", "./", "../", "~")) or Path(self.repo).expanduser().is_dir():
            return "local"
        return "hub"

    @field_validator("repo")
    @classmethod
    def _repo_shape(cls, v: str) -> str:
        if v.startswith("tiny:") and v not in ("tiny:teacher", "tiny:student"):
            raise ValueError(f"tiny models are `tiny:teacher` or `tiny:student`, got {v!r}")
        return v


class DataConfig(_Part):
    """Training and held-out text."""

    source: str = Field(
        "smoke",
        description="`smoke` (the corpus bundled with kdflow), a local .txt/.jsonl/.parquet file or folder, "
        "or `hf-dataset:owner/name` (files of a hub dataset repo).",
        min_length=1,
    )
    revision: str = Field("main", description="Revision of a hub dataset source.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet records.")
    seq_len: int = Field(64, gt=1, description="Tokens per packed training block (≤ the models' context).")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="Fraction of packed blocks kept aside (deterministically) for eval."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Read at most this many tokens from the source (None: all of it)."
    )


class KDConfig(_Part):
    """The distillation objective: alpha*CE + (1-alpha)*T^2*D(teacher_T, student_T)."""

    alpha: float = Field(0.3, ge=0, le=1, description="Weight of the hard-label cross-entropy term.")
    temperature: float = Field(4.0, description="Softmax temperature T for the divergence term (> 0).")
    divergence: Divergence = Field(
        "forward_kl",
        description="forward_kl = KL(teacher||student) (Hinton 2015); reverse_kl = KL(student||teacher); "
        "jsd = generalized Jensen-Shannon with jsd_beta (GKD, Agarwal et al. 2024).",
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="β of the generalized JSD (0/1 reduce to the two KLs).")
    chunk_size: int = Field(
        256, gt=0, description="Tokens per chunk in the fused-linear loss: no full [tokens, vocab] logits exist."
    )
    max_dropped_mass: float = Field(
        1e-3,
        ge=0,
        le=1,
        description="Largest mean teacher probability allowed on teacher-only (padding) vocab rows that are cut.",
    )

    @field_validator("temperature")
    @classmethod
    def _positive_t(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be > 0, got {v:g}")
        return v


class TrainConfig(_Part):
    """The optimisation loop."""

    steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1.5e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for torch, python and numpy (data order and init).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, float32 on CPU. bfloat16 on CPU is refused."
    )
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    resume_from: str | None = Field(
        None, description="Checkpoint folder to resume from. None: the last checkpoint of this run, if any."
    )
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")


class EvalConfig(_Part):
    """Held-out evaluation and its gates."""

    batch_size: int = Field(8, gt=0, description="Sequences per eval batch.")
    max_batches: int | None = Field(None, gt=0, description="Evaluate at most this many batches (None: all).")
    require_kl_improvement: bool = Field(
        True, description="Gate: student-after KL to the teacher must be below student-before."
    )
    collapse_perplexity_fraction: float = Field(
        0.5,
        gt=0,
        description="Collapse gate: student-after perplexity ≥ this × vocab size counts as collapsed.",
    )
    max_top_token_share: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Collapse gate: student-after predicting one token at ≥ this share of positions counts as "
        "collapsed (unless the teacher itself is at least as peaked on this data).",
    )
    collapse_entropy_fraction: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Collapse gate: student-after mean entropy ≥ this × log(vocab size) (near uniform) counts "
        "as collapsed.",
    )


class OrchestrationConfig(_Part):
    """How Prefect runs the DAG."""

    train_deployment: str | None = Field(
        None,
        description="Run training as this deployment (e.g. `kd-train/gpu` on the gpu work pool) via "
        "run_deployment. None: train in-process.",
    )
    refresh_cache: bool = Field(False, description="Ignore cached task results and run every step again.")
    retries: int = Field(2, ge=0, description="Retries of a task after a transient error.")
    retry_delay_s: float = Field(5.0, ge=0, description="Seconds between retries.")
    gpu_slots: str = Field(
        "gpu-0", description="Global concurrency limit name taken while training, one slot per GPU."
    )


class RunConfig(_Part):
    """A whole distillation: what to distil into what, on which data, how, and where evidence goes."""

    name: str | None = Field(
        None,
        description="Run name (folder under evidence_dir). None: distill-STUDENT-from-TEACHER-YYYYMMDD-HHMMSS (UTC).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    )
    teacher: ModelRef = Field(description="The larger model whose distribution is distilled.")
    student: ModelRef = Field(description="The smaller model being trained.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out text.")
    kd: KDConfig = Field(default_factory=KDConfig, description="Distillation objective.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and gates.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Prefect execution settings."
    )
    evidence_dir: str = Field("evidence", description="Folder that receives evidence/<run>/.")
    work_dir: str = Field("runs", description="Folder for checkpoints and logs while training (runs/<run>/).")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.train.warmup_steps > self.train.steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) must be ≤ train.steps ({self.train.steps})"
            )
        return self


def short_model_name(ref: ModelRef) -> str:
    """`Qwen/Qwen2.5-0.5B` -> `qwen2.5-0.5b`; `tiny:student` -> `tiny-student`; folder -> its name."""
    base = ref.repo.replace("tiny:", "tiny-").rstrip("/").split("/")[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()) or "model"


def default_run_name(cfg: RunConfig, when: str) -> str:
    return f"distill-{short_model_name(cfg.student)}-from-{short_model_name(cfg.teacher)}-{when}"


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the dotted field: `kd.temperature: must be > 0, got -1`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif "input" in e and e["type"] not in ("missing",) and "got" not in msg:
            msg = f"{msg}, got {e['input']!r}"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def validate_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err)}") from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `section.field=value` in place; the value is parsed as YAML (`1e-5`, `true`, `null`)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty field name")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML preset (or start empty), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
    for o in overrides or []:
        apply_override(data, o)
    return validate_config(data)
