"""Preflight: check config, environment, disk and paths before anything is downloaded or trained.

    report = run_preflight(cfg)      # PreflightReport; report.ok False -> the run must stop
    print(format_plan(report))       # what `kdflow run --dry-run` prints

Sizes come from the models' config.json when the folder is local (or already cached); for hub
models not yet downloaded, from the hub's file listing (safetensors bytes / 4 ≈ parameters).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from kd.config import ModelRef, RunConfig
from kd.errors import ConfigError
from kd.manifest import package_version
from kd.results import PreflightReport

BYTES_PER_PARAM_TRAINED = 16  # fp32 weights + grads + AdamW m and v
BYTES_PER_PARAM_FROZEN = 4


def _config_json(ref: ModelRef) -> dict | None:
    if ref.kind == "local":
        p = Path(ref.repo).expanduser() / "config.json"
        return json.loads(p.read_text()) if p.is_file() else None
    return None


def estimate_params(cfg_json: dict) -> int:
    """Decoder-only transformer parameter count from config.json (embeddings counted once if tied)."""
    h, v = cfg_json["hidden_size"], cfg_json["vocab_size"]
    layers, inter = cfg_json["num_hidden_layers"], cfg_json.get("intermediate_size", 4 * h)
    heads = cfg_json["num_attention_heads"]
    kv = cfg_json.get("num_key_value_heads", heads)
    head_dim = cfg_json.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter
    emb = v * h * (1 if cfg_json.get("tie_word_embeddings", False) else 2)
    return layers * (attn + mlp + 2 * h) + emb + h


def memory_estimate(student_params: int, teacher_params: int, cfg: RunConfig, hidden: int) -> int:
    """Weights/grads/optimizer of the student, frozen teacher, and one chunk of fused-loss logits."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    activations = tokens * hidden * 4 * 40  # rough: ~40 hidden-sized fp32 tensors per token kept for backward
    chunk_logits = cfg.kd.chunk_size * 4 * 4 * 160_000  # a few (chunk, V) fp32 buffers, V ≤ ~160k
    return student_params * BYTES_PER_PARAM_TRAINED + teacher_params * BYTES_PER_PARAM_FROZEN + activations + chunk_logits


def _writable(path: Path) -> tuple[bool, str]:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kdflow-write-check-"):
            pass
        return True, str(path.resolve())
    except OSError as err:
        return False, f"{path}: not writable ({err.strerror or err})"


def _model_info(ref: ModelRef) -> dict:
    info: dict = {"repo": ref.repo, "revision": ref.revision if ref.kind == "hub" else None, "kind": ref.kind}
    cj = _config_json(ref)
    if cj is not None:
        info.update(vocab_size=cj.get("vocab_size"), hidden_size=cj.get("hidden_size"),
                    params=estimate_params(cj), max_positions=cj.get("max_position_embeddings"))
    elif ref.kind == "hub":
        from kd.hub import remote_download_bytes

        size = remote_download_bytes(ref)
        info.update(download_bytes=size, params=None if size is None else size // 4)
    elif ref.kind == "tiny":
        info.update(params=None, download_bytes=0, note="generated locally on first use (~15 s)")
    return info


def run_preflight(cfg: RunConfig) -> PreflightReport:
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    cuda = torch.cuda.is_available()
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    check("torch", True, f"torch {torch.__version__}")
    remote = cfg.orchestration.train_deployment
    if remote and (cfg.train.device == "cuda" or cfg.train.dtype == "bfloat16"):
        # training runs on the work pool's machine: its CUDA is checked there, when training starts
        check("cuda", True, f"training runs on deployment {remote}; CUDA/bf16 are checked on its worker")
    else:
        if cfg.train.device == "cuda":
            check("cuda", cuda, "CUDA available" if cuda else "train.device=cuda but no CUDA device is visible")
        if cfg.train.dtype == "bfloat16":
            check("bf16", bf16, "bf16 supported" if bf16 else "train.dtype=bfloat16 needs a CUDA device with bf16")

    for ref, role in ((cfg.teacher, "teacher"), (cfg.student, "student")):
        if ref.kind == "local":
            d = Path(ref.repo).expanduser()
            ok = (d / "config.json").is_file()
            check(f"{role}-folder", ok, f"{d}: {'has config.json' if ok else 'no config.json (not a model folder)'}")

    teacher, student = _model_info(cfg.teacher), _model_info(cfg.student)
    if cfg.data.source not in ("smoke",) and not cfg.data.source.startswith("hf-dataset:"):
        exists = Path(cfg.data.source).expanduser().exists()
        check("data-source", exists, f"data.source {cfg.data.source!r} {'exists' if exists else 'not found'}")
    max_pos = student.get("max_positions")
    if max_pos:
        ok = cfg.data.seq_len <= max_pos
        check("seq-len", ok, f"data.seq_len={cfg.data.seq_len} vs max_position_embeddings={max_pos}")

    paths_ok = True
    for label, p in (("evidence_dir", cfg.evidence_dir), ("work_dir", cfg.work_dir)):
        ok, detail = _writable(Path(p))
        paths_ok &= ok
        check(f"writable-{label}", ok, detail)

    download = sum(m.get("download_bytes") or 0 for m in (teacher, student))
    unknown = [role for role, m in (("teacher", teacher), ("student", student))
               if m.get("params") is None and m["kind"] != "tiny"]
    s_params = student.get("params") or 0
    t_params = teacher.get("params") or 0
    ckpt_bytes = s_params * 4 * 2 + s_params * 8  # two kept checkpoints + optimizer state
    needed = download + ckpt_bytes
    probe = Path(cfg.work_dir) if paths_ok else Path(".")
    free = shutil.disk_usage(probe if probe.exists() else Path(".")).free
    note = f" (size of {', '.join(unknown)} unknown: hub not reachable)" if unknown else ""
    check("disk", free > needed, f"{free / 2**30:.1f} GiB free, ~{needed / 2**30:.2f} GiB needed{note}")
    mem = None if unknown else memory_estimate(s_params, t_params, cfg, student.get("hidden_size") or 1024)

    plan = {
        "teacher": teacher,
        "student": student,
        "data": {"source": cfg.data.source, "seq_len": cfg.data.seq_len},
        "steps": cfg.train.steps,
        "tokens_per_step": cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len,
        "objective": f"{cfg.kd.alpha}*CE + {1 - cfg.kd.alpha:g}*T^2*{cfg.kd.divergence} (T={cfg.kd.temperature})",
        "training": cfg.orchestration.train_deployment or "in-process",
        "evidence": str(Path(cfg.evidence_dir) / (cfg.name or "<run name>")),
    }
    return PreflightReport(
        ok=all(c["ok"] for c in checks),
        python=platform.python_version(), torch=torch.__version__, transformers=package_version("transformers") or "?",
        huggingface_hub=package_version("huggingface_hub") or "?", prefect=package_version("prefect"),
        device=device, cuda_available=cuda, bf16_supported=bf16,
        free_disk_bytes=free, needed_disk_bytes=needed, memory_estimate_bytes=mem, checks=checks, plan=plan,
    )


def raise_if_failed(report: PreflightReport) -> None:
    bad = [c for c in report.checks if not c["ok"]]
    if bad:
        raise ConfigError("preflight failed: " + "; ".join(f"{c['name']}: {c['detail']}" for c in bad))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("", "K", "M", "G"):
        if n < 1000:
            return f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def format_plan(report: PreflightReport) -> str:
    p = report.plan
    lines = ["kdflow plan"]
    for role in ("teacher", "student"):
        m = p[role]
        rev = f"@{m['revision']}" if m.get("revision") else ""
        lines.append(f"  {role:8} {m['repo']}{rev} ({m['kind']}, params ~{_size(m.get('params'))}, "
                     f"vocab {m.get('vocab_size', '?')})")
    lines += [
        f"  data     {p['data']['source']} (seq_len {p['data']['seq_len']})",
        f"  steps    {p['steps']} x {p['tokens_per_step']} tokens",
        f"  loss     {p['objective']}",
        f"  training {p['training']} on {report.device}",
        "  memory   " + ("unknown (model sizes unknown)" if report.memory_estimate_bytes is None
                         else f"~{report.memory_estimate_bytes / 2**30:.2f} GiB peak (estimate)"),
        f"  disk     ~{report.needed_disk_bytes / 2**30:.2f} GiB needed, {report.free_disk_bytes / 2**30:.1f} GiB free",
        f"  evidence {p['evidence']}",
        "checks:",
    ]
    lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}" for c in report.checks]
    return "\n".join(lines)
