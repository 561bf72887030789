"""Preflight: check the inputs, the environment, disk and paths before anything is downloaded or trained.

    report = run_preflight(cfg)      # InputError (exit 2) naming the file/field at fault, or a PreflightReport
    raise_if_failed(report)          # environment problems (disk, CUDA, unwritable folder) -> ConfigError
    print(format_plan(report))       # what `kdflow run --dry-run` prints

Inputs are checked from headers and metadata only (kd.inspect_*): the run name fits the file
system; each local model folder's config.json, tokenizer files and safetensors headers are whole
and agree with each other and with the architecture transformers builds from config.json (on the
`meta` device: no weights are read); the data files decode and hold enough tokens. The cheap checks
run first and do not import torch or transformers, so a broken input fails in well under a second.
Hub models are checked the same way right after they are pulled (`inspect_model_folder`).

Sizes come from the models' config.json when the folder is local (or already cached); for hub
models not yet downloaded, from the hub's file listing (safetensors bytes / 4 ≈ parameters).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

from kd.config import ModelRef, RunConfig, default_run_name
from kd.errors import ConfigError, InputError, ModelError
from kd.inspect_data import check_data_files, check_enough_tokens, data_files
from kd.inspect_model import check_architecture, check_tokenizer, config_field, read_model_config
from kd.inspect_weights import inspect_weights
from kd.results import PreflightReport
from kd.train.checkpoint import check_resume_dir

BYTES_PER_PARAM_TRAINED = 16  # fp32 weights + grads + AdamW m and v
BYTES_PER_PARAM_FROZEN = 4


def model_folder(ref: ModelRef) -> Path | None:
    """The local folder behind `ref` when there is one now (a local folder, generated tiny models)."""
    if ref.kind == "local" and not getattr(ref, "is_gguf", False):
        return Path(ref.repo).expanduser()
    if ref.kind == "tiny":  # same place as kd.tiny.tiny_dir, without importing torch
        from kd.tiny import tiny_dir

        d = tiny_dir() / ref.repo.removeprefix("tiny:")
        return d if (d / "config.json").is_file() else None
    return None


def _config_json(ref: ModelRef) -> dict | None:
    d = model_folder(ref)
    return read_model_config(d) if d is not None and (d / "config.json").is_file() else None


def estimate_params(cfg_json: dict) -> int:
    """Decoder-only transformer parameter count from config.json (embeddings counted once if tied)."""
    h, v = config_field(cfg_json, "hidden_size"), config_field(cfg_json, "vocab_size")
    layers, inter = config_field(cfg_json, "num_hidden_layers"), cfg_json.get("intermediate_size") or 4 * h
    heads = config_field(cfg_json, "num_attention_heads")
    if heads:
        kv = cfg_json.get("num_key_value_heads") or heads
        head_dim = cfg_json.get("head_dim") or h // heads
        attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    else:  # no attention heads (a state-space model): about as many mixing weights as q, k, v, o
        attn = 4 * h * h
    mlp = 3 * h * inter
    emb = v * h * (1 if cfg_json.get("tie_word_embeddings", False) else 2)
    return layers * (attn + mlp + 2 * h) + emb + h


def memory_estimate(student_params: int, teacher_params: int, cfg: RunConfig, hidden: int) -> int:
    """Weights/grads/optimizer of the student, frozen teacher, and one chunk of fused-loss logits."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    activations = tokens * hidden * 4 * 40  # rough: ~40 hidden-sized fp32 tensors per token kept for backward
    chunk_logits = cfg.kd.chunk_size * 4 * 4 * 160_000  # a few (chunk, V) fp32 buffers, V ≤ ~160k
    total = student_params * BYTES_PER_PARAM_TRAINED + teacher_params * BYTES_PER_PARAM_FROZEN + activations + chunk_logits
    return total + generation_memory(cfg, hidden)


def on_policy_plan(cfg: RunConfig) -> str | None:
    """The plan's policy line: what generates, how often, with which loss; None when off-policy only."""
    op = cfg.kd.on_policy
    if not op.enabled:
        return None
    parts = []
    if op.fraction > 0:
        parts.append(f"{op.fraction:g} of micro-batches sampled by the student")
    if op.seq_kd:
        parts.append(f"{1 - op.fraction:g} completed by the teacher (seq_kd)")
    elif op.fraction < 1:
        parts.append(f"{1 - op.fraction:g} prepared text")
    return (f"{', '.join(parts)}; {op.generator} generate, <= {op.max_new_tokens} new tokens, T={op.temperature:g}, "
            f"top_p={op.top_p:g}; generated batches: {op.divergence} at T={op.loss_temperature:g}, no CE")


def generation_memory(cfg: RunConfig, hidden: int, layers: int = 32) -> int:
    """kd.on_policy: the KV cache of one generation (K and V, fp32, every layer, prompt + new tokens) and the
    longer training sequence it becomes (its activations beyond data.seq_len); 0 when off."""
    op = cfg.kd.on_policy
    if not op.enabled:
        return 0
    length = op.max_prompt_tokens + op.max_new_tokens
    kv = cfg.train.batch_size * length * hidden * 2 * 4 * layers
    extra = max(0, length - cfg.data.seq_len) * cfg.train.batch_size * hidden * 4 * 40
    return kv + extra


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
    if getattr(ref, "is_gguf", False) and ref.kind == "local":  # sized from the GGUF header (issue 11)
        from kd.gguf import gguf_size_info

        info.update(gguf_size_info(Path(ref.repo)))
        return info
    cj = _config_json(ref)
    if cj is not None:
        info.update(vocab_size=config_field(cj, "vocab_size"), hidden_size=config_field(cj, "hidden_size"),
                    params=estimate_params(cj), max_positions=cj.get("max_position_embeddings"),
                    layers=cj.get("num_hidden_layers"))
    elif ref.kind == "hub":
        from kd.hub import remote_download_bytes

        size = remote_download_bytes(ref)
        info.update(download_bytes=size, params=None if size is None else size // 4)
    elif ref.kind == "tiny":  # not generated yet: sized from the config make_tiny will use
        from kd.tiny import tiny_config

        cj = tiny_config(ref.repo.removeprefix("tiny:"))
        info.update(vocab_size=cj["vocab_size"], hidden_size=cj["hidden_size"], params=estimate_params(cj),
                    max_positions=cj.get("max_position_embeddings"), layers=cj.get("num_hidden_layers"),
                    download_bytes=0, note="generated locally on first use (~15 s)")
    return info


# --------------------------------------------------------------------------- inputs (headers and metadata)
TEMP_SUFFIX_BYTES = 24  # kdflow's temporary names add at most this to a run name (".tmp-", ".<pid>.tmp")
NAME_MAX_DEFAULT = 255


def _name_max(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return os.pathconf(p, "PC_NAME_MAX")
            except (OSError, ValueError):
                break
    return NAME_MAX_DEFAULT


def check_run_name(cfg: RunConfig) -> str:
    """The run's folder name (given, or the default built from the model names) fits the file system."""
    name = cfg.name or default_run_name(cfg, "YYYYMMDD-HHMMSS")
    field = "name" if cfg.name else "name (default, from the model names)"
    limit = min(_name_max(Path(cfg.evidence_dir).expanduser()), _name_max(Path(cfg.work_dir).expanduser()))
    size = len(name.encode())
    if size + TEMP_SUFFIX_BYTES > limit:
        raise ConfigError(f"{field}: the run name is {size} bytes ({name[:32]}...); run folders and their temporary "
                          f"names (+{TEMP_SUFFIX_BYTES} bytes) must fit the file system's {limit}-byte file-name "
                          f"limit (NAME_MAX): use at most {limit - TEMP_SUFFIX_BYTES} bytes")
    return f"{name} ({size} bytes)"


def inspect_model_folder(d: str | Path, role: str, trust_remote_code: bool = False, *, deep: bool = True) -> str:
    """config.json, tokenizer and weight headers of one model folder; with `deep`, also the architecture
    (transformers must know it and its weight names/shapes must match the header). ModelError otherwise."""
    d = Path(d).expanduser()
    if not d.is_dir():
        raise ModelError(f"{role} folder {d}: no such folder")
    raw = read_model_config(d)
    check_tokenizer(d, role, raw)
    tensors = inspect_weights(d)
    if not deep:
        return f"{d}: config, tokenizer and {len(tensors or ())} tensor headers ok"
    arch = check_architecture(d, raw, tensors, trust_remote_code)
    return f"{d}: {arch}, {len(tensors or ())} tensors match config.json"


class _Inputs:
    """Runs checks in order, remembering each outcome; `failed` holds the InputErrors."""

    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.failed: list[tuple[str, InputError]] = []

    def run(self, name: str, fn, *args, **kwargs):
        try:
            value = fn(*args, **kwargs)
        except InputError as err:
            self.failed.append((name, err))
            self.checks.append({"name": name, "ok": False, "detail": str(err)})
            return None
        detail = value if isinstance(value, str) else "ok"
        self.checks.append({"name": name, "ok": True, "detail": detail})
        return value

    def raise_failed(self) -> None:
        if self.failed:
            first = self.failed[0][1]
            raise type(first)("preflight: " + "; ".join(f"{name}: {err}" for name, err in self.failed))


def check_inputs(cfg: RunConfig) -> list[dict]:
    """Every input, from headers and metadata; the first InputError class raised with all problems in one line.

    Cheap checks first (no torch/transformers import); the architecture checks only once they pass."""
    inputs = _Inputs()
    inputs.run("run-name", check_run_name, cfg)
    inputs.run("on-policy", check_on_policy, cfg)
    if cfg.train.resume_from:  # files only: a planted trainer_state.pt is named, never opened (kd/train/checkpoint.py)
        inputs.run("resume-from", check_resume_dir, cfg.train.resume_from)
    folders: dict[str, Path] = {}
    for ref, role in ((cfg.teacher, "teacher"), (cfg.student, "student")):
        d = model_folder(ref)
        if getattr(ref, "is_gguf", False) and ref.kind == "local":
            inputs.run(f"{role}-gguf", _inspect_gguf, Path(ref.repo).expanduser())
        elif d is not None and inputs.run(f"{role}-model", inspect_model_folder, d, role, deep=False):
            folders[role] = d
    if cfg.eval.benchmarks.tasks:  # lm-eval tasks: known and with offline data (issue 20), else exit 2 naming it
        inputs.run("benchmarks", _check_benchmarks, cfg.eval.benchmarks)
    if cfg.eval.reference_text is not None:  # out-of-domain text: readable, not the training source (issue 27)
        inputs.run("reference-text", _check_reference, cfg.eval.reference_text, cfg.data.source)
    spec = cfg.student.init.from_teacher if cfg.student.kind == "pruned" else None
    if spec is not None and spec.measured and spec.calibration is not None:  # the layer choice's own text
        inputs.run("layer-calibration", _check_calibration, spec.calibration, cfg.eval.reference_text)
    files = inputs.run("data-files", data_files, cfg.data)
    docs = inputs.run("data-decode", _decode, cfg.data, files) if files else None
    if docs and "student" in folders:
        inputs.run("data-tokens", _enough_tokens, cfg, docs, folders["student"] / "tokenizer.json")
    inputs.raise_failed()
    for ref, role in ((cfg.teacher, "teacher"), (cfg.student, "student")):
        if role in folders:
            inputs.run(f"{role}-architecture", _architecture, folders[role], ref.trust_remote_code)
    inputs.raise_failed()
    return inputs.checks


def check_on_policy(cfg: RunConfig) -> str:
    """kd.on_policy: generated completions need the teacher online (the offline cache holds only the prepared
    tokens' top-k); a prompt and its completion must fit the student's context."""
    op = cfg.kd.on_policy
    if not op.enabled:
        return "off-policy only (kd.on_policy.fraction 0)"
    knob = "kd.on_policy.fraction" if op.fraction > 0 else "kd.on_policy.seq_kd"
    served = cfg.teacher.server is not None and not op.seq_kd  # the engine scores the samples (teacher-server docs)
    if cfg.kd.teacher_mode == "offline" and not served:
        raise ConfigError(f"kd.teacher_mode=offline and {knob}={getattr(op, knob.rsplit('.', 1)[1])} cannot go "
                          "together: the offline teacher cache scores only the prepared tokens, not generated "
                          "completions; set kd.teacher_mode=online or kd.on_policy.fraction=0 / seq_kd=false")
    who = "student" + (" + teacher (seq_kd)" if op.seq_kd else "") if op.fraction > 0 else "teacher (seq_kd)"
    return (f"{who} generate with {op.generator} on {op.fraction:g} of micro-batches, up to {op.max_new_tokens} "
            f"new tokens (T={op.temperature:g}, top_p={op.top_p:g}), loss {op.divergence} at T={op.loss_temperature:g}"
            + (f", scored by the served teacher's top-{cfg.kd.top_k} + tail" if served else ""))


def _check_benchmarks(bench_cfg) -> str:
    from kd.evaluate.benchmarks import check_tasks

    return check_tasks(bench_cfg)


def _check_reference(reference_text: str, data_source: str) -> str:
    from kd.evaluate.benchmarks import check_reference

    return check_reference(reference_text, data_source)


def _check_calibration(calibration: str, reference_text: str | None) -> str:
    """student.init.from_teacher.calibration names readable text that is not eval.reference_text: the
    out-of-domain verdict must not have chosen the student's layers. ConfigError naming the field otherwise."""
    from kd.bundled import contains, text_files
    from kd.evaluate.bundled_tasks import reference_files

    field = f"student.init.from_teacher.calibration {calibration!r}"
    files = text_files(calibration)  # what calibration_from_text will read
    if not files:
        raise ConfigError(f"{field}: no bundled text, .txt file or folder of .txt files there")
    if reference_text is not None:
        try:
            reference = reference_files(reference_text)  # resolved paths
        except ConfigError:  # named by the reference-text check
            reference = []
        if contains(calibration, reference):
            raise ConfigError(f"{field} is (inside) eval.reference_text {reference_text!r}: the layers would be "
                              "chosen on the text that judges the student; calibrate on another text")
    return f"layer calibration {calibration}: {len(files)} file(s), {sum(f.stat().st_size for f in files):,} bytes"


def _benchmark_plan(cfg: RunConfig, student: dict, cuda: bool) -> dict:
    from kd.evaluate.benchmarks import plan_estimate

    try:
        files = data_files(cfg.data)
        held = int(sum(f.stat().st_size for f in files) * cfg.data.heldout_fraction)
    except (InputError, OSError):
        held = None
    return plan_estimate(cfg.eval.benchmarks, heldout_bytes=held, params=student.get("params"), cuda=cuda,
                         reference_text=cfg.eval.reference_text)


def _inspect_gguf(path: Path) -> str:
    from kd.gguf import inspect_gguf  # GGUF headers: kd.gguf (issue 11)

    info = inspect_gguf(path)
    return f"{path}: GGUF {info.get('architecture')}, header ok"


def _decode(data_cfg, files: list[Path]) -> list:
    docs = check_data_files(data_cfg, files)
    return docs


def _enough_tokens(cfg: RunConfig, docs: list, tokenizer_json: Path) -> str:
    have = check_enough_tokens(cfg, docs, tokenizer_json)
    return "counted when the data is prepared" if have is None else f"≥ {have} tokens, enough"


def _architecture(d: Path, trust_remote_code: bool) -> str:
    raw = read_model_config(d)
    return f"{check_architecture(d, raw, inspect_weights(d), trust_remote_code)} matches the weight headers"


def run_preflight(cfg: RunConfig) -> PreflightReport:
    """Inputs first (InputError at the first bad one, before torch is imported), then the environment."""
    checks: list[dict] = check_inputs(cfg)
    import torch

    from kd.evidence.manifest import package_version

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
            on_cpu = not cuda or cfg.train.device == "cpu"  # bf16 autocast runs on CPU too (issue 14)
            check("bf16", bf16 or on_cpu, "bf16 autocast on CPU" if on_cpu else "bf16 supported" if bf16
                  else "train.dtype=bfloat16 needs a CUDA device with bf16")
        if cfg.train.distributed != "none":  # torchrun ranks on this host (issue 14)
            from kd.train.distributed.launch import resolve_nproc
            from kd.errors import ConfigError

            try:
                check("ranks", True, f"{cfg.train.distributed} on {resolve_nproc(cfg)} rank(s) per node "
                      f"x {cfg.train.rendezvous.nnodes} node(s)")
            except ConfigError as err:
                check("ranks", False, str(err))

    teacher, student = _model_info(cfg.teacher), _model_info(cfg.student)
    if cfg.student.kind == "pruned":  # built from the teacher's layers (issue 11): sized from the teacher
        from kd.prune import pruned_size_info

        student.update(pruned_size_info(teacher, cfg.student.init.from_teacher))
        if cfg.student.init.tokenizer is not None:  # transplanted onto another tokenizer: its embedding rows
            from kd.cross_tokenizer.vocab_files import VOCAB_SIZES

            v_new, v_old, width = VOCAB_SIZES[cfg.student.init.tokenizer], student.get("vocab_size"), student.get("hidden_size")
            if student.get("params") is not None and isinstance(v_old, int) and isinstance(width, int):
                student["params"] = int(student["params"] + (v_new - v_old) * width)
            student["vocab_size"] = v_new
    max_pos = student.get("max_positions")
    if max_pos:
        ok = cfg.data.seq_len <= max_pos
        check("seq-len", ok, f"data.seq_len={cfg.data.seq_len} vs max_position_embeddings={max_pos}")

    paths_ok = True
    for label, p in (("evidence_dir", cfg.evidence_dir), ("work_dir", cfg.work_dir)):
        ok, detail = _writable(Path(p))
        paths_ok &= ok
        check(f"writable-{label}", ok, detail)

    storage = None
    if cfg.train.rendezvous.nnodes > 1:  # every node reads/writes both folders (issue 19)
        storage = shared_storage(cfg)
        for c in storage["checks"]:
            check(c["name"], c["ok"], c["detail"])

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
        "objective": f"{cfg.kd.alpha}*CE + {1 - cfg.kd.alpha:g}*T^2*"
        + (f"cross-tokenizer {cfg.kd.cross_tokenizer.kind} over byte-aligned groups" if cfg.kd.cross_tokenizer.enabled
           else cfg.kd.divergence) + f" (T={cfg.kd.temperature})",
        "on_policy": on_policy_plan(cfg),
        "training": cfg.orchestration.train_deployment or "in-process",
        **({} if storage is None else {
            "nodes": f"{cfg.train.rendezvous.nnodes} x {cfg.orchestration.node_deployment} runs, "
                     f"{cfg.train.nproc_per_node} rank(s) each",
            "storage": storage["summary"]}),
        "evidence": str(Path(cfg.evidence_dir) / (cfg.name or "<run name>")),
    }
    if cfg.eval.benchmarks.tasks:  # documents per task and a rough time (issue 20)
        plan["benchmarks"] = _benchmark_plan(cfg, student, cuda)
    return PreflightReport(
        ok=all(c["ok"] for c in checks),
        python=platform.python_version(), torch=torch.__version__, transformers=package_version("transformers") or "?",
        huggingface_hub=package_version("huggingface_hub") or "?", prefect=package_version("prefect"),
        device=device, cuda_available=cuda, bf16_supported=bf16,
        free_disk_bytes=free, needed_disk_bytes=needed, memory_estimate_bytes=mem, checks=checks, plan=plan,
    )


# file systems every node of a cluster can mount at the same path (FUSE mounts are assumed shared too)
SHARED_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "cephfs", "lustre", "gpfs", "beegfs", "glusterfs",
             "orangefs", "wekafs", "panfs", "virtiofs", "afs"}


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) holding `path` (its nearest existing ancestor)."""
    import psutil

    p = path.expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best = ("/", "?")
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (str(p) == mp or str(p).startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, part.fstype)
    return best


def shared_storage(cfg: RunConfig) -> dict:
    """Multi-node: are work_dir and evidence_dir on storage every node sees? One host (a loopback
    rendezvous): the same path, trivially. Several hosts: the file system must be a network/cluster one.
    Each node also checks, before torchrun starts, that it sees the step's probe files there."""
    r = cfg.train.rendezvous
    host = (r.endpoint.rsplit(":", 1)[0].strip("[]") if r.endpoint else r.host)
    one_host = host in ("127.0.0.1", "localhost", "::1")
    checks, parts = [], []
    for field in ("work_dir", "evidence_dir"):
        path = Path(getattr(cfg, field)).expanduser().resolve()
        mount, fstype = _mount_of(path)
        if one_host:
            ok, detail = True, (f"{field} {path}: every node runs on this host (rendezvous {host}), so all see "
                                f"the same path ({fstype} at {mount})")
        else:
            ok = fstype in SHARED_FS or fstype.startswith("fuse")
            detail = (f"{field} {path} is on {fstype} at {mount}" + (", shared storage every node can mount" if ok else
                      f", local to this host: nodes on other hosts will not see it; put {field} on shared storage "
                      "(NFS, CephFS, Lustre, a ReadWriteMany volume) mounted at the same path on every node"))
        checks.append({"name": f"shared-{field}", "ok": ok, "detail": detail})
        parts.append(f"{field} {path} ({fstype})")
    where = "one host: same path on every node" if one_host else "several hosts: shared file system required"
    return {"checks": checks, "summary": f"{where}; {', '.join(parts)}; each node re-checks it sees them"}


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
        extra = "".join(f", {k} {m[k]}" for k in ("quant_types", "layers") if m.get(k))  # GGUF / pruned (issue 11)
        lines.append(f"  {role:8} {m['repo']}{rev} ({m['kind']}, params ~{_size(m.get('params'))}, "
                     f"vocab {m.get('vocab_size', '?')}{extra})")
    lines += [
        f"  data     {p['data']['source']} (seq_len {p['data']['seq_len']})",
        f"  steps    {p['steps']} x {p['tokens_per_step']} tokens",
        f"  loss     {p['objective']}",
        *([f"  policy   {p['on_policy']}"] if p.get("on_policy") else []),
        f"  training {p['training']} on {report.device}",
        *([f"  nodes    {p['nodes']}", f"  storage  {p['storage']}"] if p.get("storage") else []),
        "  memory   " + ("unknown (model sizes unknown)" if report.memory_estimate_bytes is None
                         else f"~{report.memory_estimate_bytes / 2**30:.2f} GiB peak (estimate)"),
        f"  disk     ~{report.needed_disk_bytes / 2**30:.2f} GiB needed, {report.free_disk_bytes / 2**30:.1f} GiB free",
        f"  evidence {p['evidence']}",
    ]
    if p.get("benchmarks"):
        b = p["benchmarks"]
        docs = ", ".join(f"{t} {'?' if n is None else f'~{n}'}" for t, n in b["docs"].items())
        est = "unknown" if b.get("estimate_s") is None else f"~{b['estimate_s']:.0f} s (rough)"
        total = sum(n or 0 for n in b["docs"].values())
        lines.append(f"  benchmarks {docs} docs (~{total} in all) x 3 models, {est}")
    lines.append("checks:")
    lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}" for c in report.checks]
    return "\n".join(lines)
