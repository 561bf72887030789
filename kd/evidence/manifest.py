"""The evidence manifest: a versioned schema, an atomic writer, and its reader.

    m = write_evidence(Path("evidence/run-1"), config=cfg, preflight=pre, models={"teacher": t,
                       "student": s}, vocab=va, training=tr, eval_report=ev, falsifiers=None,
                       flow_run_id=id, flow_run_url=url, start=t0, end=t1)
    m = load_manifest(Path("evidence/run-1")); manifest_json_schema()

Verifying a run folder is kd/evidence/verify.py (`verify_run_dir`), showing and diffing it
kd/evidence/view.py: both read manifests through this module, which imports neither.

A run folder holds `manifest.json`, `train.log`, `metrics.jsonl`, `eval.json`, `loss_curve.png`,
the student checkpoint under `checkpoint/` (or, when kept elsewhere, its path and sha256 in
`checkpoint`), and any extra files; `files` maps every file but manifest.json to its sha256.

Contract (issue 2, extended additively): schema_version, run {name, flow_run_id, start, end,
status}, config, environment, code {git_commit, dirty}, models, vocab, training {steps,
initial_loss, final_loss, tokens, wall_s, ...}, eval, falsifiers [{id, claim, observed, verdict}],
files, lineage (which steps were reused from cache, and from which run). `status` is `pass` only
when every falsifier passes and nothing is missing (`notes` is empty); the schema refuses anything
else. Falsifiers come from kd/evidence/verdicts.py, and `verify_run_dir` recomputes them from the recorded
numbers with the same functions: a verdict or status edited to `pass` fails verification.
`manifest.sig` (kd/evidence/signing.py), when present, is the only file not listed in `files`.
The manifest is written last, through a temp file and os.replace, after any old manifest is
removed: a crash leaves no manifest, never one that claims success. Secrets are redacted (see
kd/evidence/redact.py). `verify_run_dir` checks integrity, not success: a `fail` run with intact files
verifies.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import kd
from kd.config import RunConfig, format_validation_error
from kd.errors import InputError
from kd.hashing import digest_of, hash_tree, sha256_file
from kd.plots import plot_loss_curve
from kd.evidence.redact import recordable_env, redact, scrub, secret_values, shorten
from kd.results import (
    EvalReport, Falsifier, ModelSnapshot, PreparedData, PreflightReport, StepLineage, TrainResult, VocabAlignment,
)
from kd.evidence.verdicts import recompute_falsifiers, run_status

SCHEMA_VERSION = "1.1"  # bump the minor for additive changes; verify accepts any 1.x
MANIFEST = "manifest.json"
SIG_FILE = "manifest.sig"  # kd/evidence/signing.py: a signature over manifest.json, written after it
# Optimizer/RNG state stays in the work dir: evidence carries the loadable model only (and no pickles).
_CKPT_SKIP_PREFIXES = ("optimizer", "scheduler", "rng", "trainer_state",
                       "distributed_state", ".metadata")  # distributed: DCP's pickled index (kd/train/distributed)
_CKPT_SKIP_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".distcp")  # .distcp: DCP weight+AdamW shards


class EvidenceError(InputError):
    """A run folder or its manifest is not there (exit 2: the path given is wrong)."""


class EvidenceInvalid(Exception):
    """manifest.json is there but does not validate (exit 1: the evidence fails, like a bad sha256)."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


class RunInfo(_M):
    name: str
    flow_run_id: str | None = Field(None, description="Prefect flow-run id (None outside a flow)")
    flow_run_url: str | None = Field(None, description="Prefect UI URL of the flow run, when a server is set")
    start: datetime
    end: datetime
    status: Literal["pass", "fail"] = Field(description="pass only if every falsifier passes")


class EnvironmentInfo(_M):
    python: str
    platform: str = ""
    torch: str
    transformers: str | None
    prefect: str | None
    huggingface_hub: str | None
    device: str
    env: dict[str, str] = Field(default_factory=dict, description="Allowlisted env vars (kd.evidence.redact.ENV_ALLOWLIST), "
                                "secrets redacted, URL credentials cut")


class CodeInfo(_M):
    git_commit: str = Field(description="40-hex commit of the kdflow source, or `unknown`")
    dirty: bool | None = Field(description="Uncommitted changes in the source tree (None: not a git repo)")
    kdflow_version: str = kd.__version__


class CheckpointInfo(_M):
    path: str = Field(description="`checkpoint` (in this folder) or where it was kept")
    sha256: str = Field(description="sha256 over sorted `relpath\\0sha256` lines of the checkpoint's files")
    in_evidence: bool
    source: str = Field(description="Checkpoint folder the trainer wrote")


class Models(_M):
    teacher: ModelSnapshot | None = None
    student: ModelSnapshot | None = None


class Manifest(_M):
    """Everything a reviewer needs to trust (or refute) one distillation run."""

    schema_version: str = SCHEMA_VERSION
    run: RunInfo
    config: dict = Field(description="The full RunConfig, secrets redacted")
    environment: EnvironmentInfo
    code: CodeInfo
    preflight: PreflightReport | None = None
    models: Models = Field(default_factory=Models)
    vocab: VocabAlignment | None = None
    data: PreparedData | None = Field(None, description="The prepared data: counts (skipped, truncated, dropped), "
                                      "histogram, samples, content hash")
    training: TrainResult | None = None
    checkpoint: CheckpointInfo | None = None
    eval: EvalReport | None = None
    falsifiers: list[Falsifier] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict, description="relpath -> sha256 of every other file")
    notes: list[str] = Field(default_factory=list, description="What could not be collected, and why")
    lineage: dict[str, StepLineage] = Field(
        default_factory=dict, description="Per cached step (pull_models, check_vocab, train_student, evaluate): "
        "whether its result was reused from cache and which run produced it")

    @model_validator(mode="after")
    def _no_fake_pass(self) -> "Manifest":
        if not self.schema_version.startswith("1."):
            raise ValueError(f"schema_version {self.schema_version!r} is not 1.x")
        if self.run.status == "pass":
            failed = [f.id for f in self.falsifiers if f.verdict != "pass"]
            if not self.falsifiers or failed or self.training is None or self.eval is None or self.notes:
                raise ValueError(
                    "run.status is pass but "
                    + (f"falsifiers {failed} failed" if failed else
                       f"evidence is incomplete: {self.notes}" if self.notes else
                       "training, eval or falsifiers are missing")
                )
        return self


def manifest_json_schema() -> dict:
    """JSON Schema of manifest.json (`kdflow evidence schema`). Non-finite metrics are written as
    the strings "NaN"/"Infinity", which the pydantic model (the verifier) accepts."""
    return Manifest.model_json_schema()


# ---------------------------------------------------------------- hashing, git, environment
def hash_files(root: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """relpath (posix) -> sha256 of every file under `root` (nothing skipped: an evidence folder
    has no caches), minus the relpaths in `exclude`."""
    return {rel: h for rel, h in hash_tree(root, skip_caches=False).items() if rel not in exclude}


def dir_sha256(path: Path) -> str:
    """One sha256 for a folder: digest_of(hash_files(path))."""
    return digest_of(hash_files(Path(path)))


def git_info(path: Path | str | None = None) -> dict:
    """{commit, dirty} of the git work tree holding `path` (default: kdflow's source); outside a
    repo, without git, or before the first commit: {"commit": "unknown", "dirty": None}."""
    where = str(path or Path(__file__).resolve().parent)

    def git(*args):
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        status = git("status", "--porcelain")
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def package_version(dist: str) -> str | None:
    """Installed version of a distribution, from its metadata (nothing is imported)."""
    try:
        return metadata.version(dist)  # metadata only: kd never imports prefect
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: str, env: dict[str, str] | None = None) -> EnvironmentInfo:
    import torch

    return EnvironmentInfo(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        transformers=package_version("transformers"),
        prefect=package_version("prefect"),
        huggingface_hub=package_version("huggingface_hub"),
        device=device,
        env=recordable_env(env),
    )


# ---------------------------------------------------------------- writing
def _copy_scrubbed(src: Path, dst: Path, secrets: set[str]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(scrub(Path(src).read_bytes(), secrets))


def _keep_in_checkpoint(p: Path) -> bool:
    name = p.name.lower()
    return not (name.startswith(_CKPT_SKIP_PREFIXES) or name.endswith(_CKPT_SKIP_SUFFIXES))


def ensure_new_run(evidence_dir: str | Path, work_dir: str | Path, name: str) -> None:
    """ConfigError naming the folder when `name` already has a non-empty evidence or work folder:
    a run folder is never reused (a rerun would adopt the old run's checkpoint, metrics and log)."""
    from kd.errors import ConfigError

    for root in (evidence_dir, work_dir):
        folder = Path(root).expanduser().resolve() / name
        try:
            taken = folder.is_dir() and any(folder.iterdir())
        except OSError:  # e.g. a name too long for the file system: preflight names that
            taken = False
        if taken:
            raise ConfigError(f"name: run folder {folder} already exists (a run folder is never reused): "
                              "choose another name, or leave `name` unset for a fresh one")


def claim_run_name(config: RunConfig, name: str, *, suffix: str) -> str:
    """`name` when its folders are free; an explicit `config.name` whose folder exists is refused
    (ConfigError, exit 2); a generated name that collides gets `-suffix` (e.g. the flow-run id)."""
    from kd.errors import ConfigError

    try:
        ensure_new_run(config.evidence_dir, config.work_dir, name)
        return name
    except ConfigError:
        if config.name:
            raise
    ensure_new_run(config.evidence_dir, config.work_dir, f"{name}-{suffix}")
    return f"{name}-{suffix}"


def ui_url_or_none(url: str | None) -> str | None:
    """A flow-run UI URL only when there is one: Prefect builds `None/flow-runs/...` without a UI URL."""
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def _copy_checkpoint(src: Path, dst: Path) -> None:
    for p in sorted(Path(src).rglob("*")):
        if p.is_file() and _keep_in_checkpoint(p):
            out = dst / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, out)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_rel(rel: str) -> bool:
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and p.as_posix() not in (MANIFEST, SIG_FILE)


def write_evidence(
    run_dir: Path,
    *,
    config: RunConfig,
    preflight: PreflightReport | None,
    models: dict[str, ModelSnapshot] | Models,
    vocab: VocabAlignment | None,
    training: TrainResult | None,
    eval_report: EvalReport | None,
    falsifiers: list[Falsifier] | None = None,
    flow_run_id: str | None = None,
    flow_run_url: str | None = None,
    start: datetime,
    end: datetime,
    extra_files: dict[str, Path] | None = None,
    copy_checkpoint: bool = True,
    env: dict[str, str] | None = None,
    data: PreparedData | None = None,
    lineage: dict[str, StepLineage] | None = None,
) -> Manifest:
    """Write the whole evidence folder and return its manifest (status pass only if every falsifier passes).

    Falsifiers are `falsifiers` plus, for ids not already given, kd.evidence.verdicts.recompute_falsifiers
    (training, vocab with config.kd.max_dropped_mass, eval gates with config.eval). Missing inputs
    (no training, a log file gone) are written down in `notes` and make the run `fail`.
    `copy_checkpoint=False` records the checkpoint's path and sha256 instead of copying it.
    `env` defaults to os.environ (used for the recorded environment and the secrets to scrub).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # From here until the final os.replace there is no manifest at all: never a stale "pass".
    (run_dir / MANIFEST).unlink(missing_ok=True)
    (run_dir / SIG_FILE).unlink(missing_ok=True)  # a signature of an older manifest signs nothing here
    for stale in run_dir.glob(f".{MANIFEST}.*.tmp"):
        stale.unlink()

    cfg_dict = config.model_dump(mode="json")
    secrets = secret_values(env, cfg_dict)
    notes: list[str] = []

    ckpt = None
    if training is not None:
        for src, name in ((training.log_path, "train.log"), (training.metrics_path, "metrics.jsonl")):
            if Path(src).is_file():
                _copy_scrubbed(Path(src), run_dir / name, secrets)
            else:
                notes.append(f"{name}: source {src} not found")
        src, dst = Path(training.checkpoint_dir), run_dir / "checkpoint"
        in_place = src.resolve() == dst.resolve()  # the trainer wrote straight into the evidence folder
        if dst.exists() and not in_place:
            shutil.rmtree(dst)  # a retry must not mix two checkpoints, nor keep a stale copy
        if not src.is_dir():
            notes.append(f"checkpoint: source {src} not found")
        elif copy_checkpoint or in_place:
            if not in_place:
                _copy_checkpoint(src, dst)
            ckpt = CheckpointInfo(path="checkpoint", sha256=dir_sha256(run_dir / "checkpoint"),
                                  in_evidence=True, source=str(src))
        else:
            ckpt = CheckpointInfo(path=str(src.resolve()), sha256=dir_sha256(src), in_evidence=False, source=str(src))
    else:
        notes.append("training: no TrainResult (the run stopped before or during training)")
    metrics = run_dir / "metrics.jsonl"
    plot_loss_curve(metrics if metrics.is_file() else Path(os.devnull), run_dir / "loss_curve.png",
                    title=f"{config.name or run_dir.name}: KD training loss")
    if eval_report is not None:
        (run_dir / "eval.json").write_text(scrub(eval_report.model_dump_json(indent=2), secrets))
        if eval_report.samples:  # teacher / student-before / student-after completions, side by side
            from kd.samples import write_samples

            for written in write_samples(eval_report.samples, run_dir).values():
                written.write_text(scrub(written.read_text(encoding="utf-8"), secrets), encoding="utf-8")
    else:
        notes.append("eval: no EvalReport")
    for rel, src in (extra_files or {}).items():
        if not safe_rel(rel):
            raise ValueError(f"extra file name {rel!r} must be a relative path inside the run folder")
        _copy_scrubbed(Path(src), run_dir / rel, secrets)

    given = list(falsifiers or [])
    auto = recompute_falsifiers(training, vocab, eval_report, max_dropped_mass=config.kd.max_dropped_mass,
                                eval_cfg=config.eval)
    ids = {f.id for f in given}
    all_f = given + [f for f in auto if f.id not in ids]
    passed = run_status(all_f, training=training, eval_report=eval_report, notes=notes) == "pass"
    if not isinstance(models, Models):
        models = Models(**models)

    device = training.device if training else (preflight.device if preflight else "cpu")
    gi = git_info()
    manifest = Manifest(
        run=RunInfo(name=config.name or run_dir.name, flow_run_id=flow_run_id, flow_run_url=ui_url_or_none(flow_run_url),
                    start=start, end=end, status="pass" if passed else "fail"),
        config=redact(cfg_dict),
        environment=environment_info(device, env),
        code=CodeInfo(git_commit=gi["commit"], dirty=gi["dirty"]),
        preflight=preflight, models=models, vocab=vocab, data=data, training=training, checkpoint=ckpt,
        eval=eval_report, falsifiers=all_f,
        files=hash_files(run_dir, exclude=(MANIFEST,)),
        notes=notes, lineage=lineage or {},
    )
    _atomic_write_text(run_dir / MANIFEST, scrub(manifest.model_dump_json(indent=2), secrets) + "\n")
    return manifest


# ---------------------------------------------------------------- reading
def load_manifest(run_dir: Path) -> Manifest:
    """The validated manifest of a run folder. EvidenceError (exit 2) when the folder or its
    manifest is missing, EvidenceInvalid (exit 1) when the manifest does not validate."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvidenceError(f"{run_dir}: run folder not found")
    path = run_dir / MANIFEST
    if not path.is_file():
        raise EvidenceError(f"{path}: missing (not an evidence folder, or the run crashed before writing it)")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise EvidenceInvalid(f"{path}: does not validate: {shorten(format_validation_error(err), 600)}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise EvidenceInvalid(f"{path}: not valid JSON: {shorten(str(err), 300)}") from None
