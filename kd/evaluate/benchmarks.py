"""Downstream benchmarks through EleutherAI's lm-evaluation-harness, for the models eval already holds.

    report = run_benchmarks({"teacher": t, "student_before": b, "student_after": a},
                            {"teacher": t_dir, "student_before": s_dir, "student_after": s_dir},
                            cfg.eval.benchmarks, bundled_dir=write_bundled_tasks(prepared.path, s_dir),
                            device="cpu", log=print)
    gates = benchmark_gates(report, cfg.eval.benchmarks)     # optional falsifiers, recomputable

Every model is wrapped in lm-eval's `HFLM(pretrained=<model in memory>, tokenizer=...)` and scored by
`lm_eval.simple_evaluate`, so the numbers are lm-eval's own: the plain CLI on a saved folder with the
same task YAML gives the same values (bench/benchmarks.py checks it). Tasks: the bundled ones
(kd/evaluate/bundled_tasks.py, no download) and any lm-eval task whose data is offline (a YAML in an
`include_paths` folder with local data files, or a registry task whose data set is in the local
Hugging Face cache); `check_tasks` refuses the rest at preflight (exit 2, naming the task).

Whenever tasks are listed, `eval.reference_text` (default `bundled:bierce`, a source no preset trains on) is
scored too, as `kdflow_bpb_reference`: bits per byte on text the run did not train on (retention) beside
the in-domain `kdflow_bpb` (specialisation). lm-eval gives no standard error for bits per byte (nor byte/word
perplexity); kdflow computes one by bootstrap over lm-eval's own per-document (log-likelihood, bytes) pairs
(`log_samples`), `bootstrap_iters` resamples, seeded, so every table carries ± intervals.

Retention of a metric = after ÷ teacher when higher is better, teacher ÷ after when lower is better
(perplexity, bits per byte), so 1.0 always means "as good as the teacher" and < 1 worse.
lm-eval is imported only when benchmarks run, and `benchmark_gates` needs neither torch nor lm-eval.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kd.config import BenchmarksConfig
from kd.errors import ConfigError
from kd.evaluate.bundled_tasks import BUNDLED, REFERENCE, code_fingerprint, reference_fingerprint
from kd.results import BenchmarkDifference, BenchmarkReport, BenchmarkScore, BenchmarkTask, Falsifier

NO_REGRESSION_ID = "F-DISTILL-BENCH-001"
RETENTION_ID = "F-DISTILL-BENCH-RETENTION-001"
MODELS = ("teacher", "student_before", "student_after")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
_STDERR_SKIP = {"N/A", None}
BOOTSTRAP_SEED = 1234


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


# ------------------------------------------------------------------------------------ preflight
def _external(cfg: BenchmarksConfig) -> list[str]:
    return [t for t in cfg.tasks if t not in BUNDLED]


def scored_tasks(cfg: BenchmarksConfig, reference_text: str | None) -> list[str]:
    """The tasks the eval step scores: eval.benchmarks.tasks, plus kdflow_bpb_reference when any are listed
    and eval.reference_text is set (out-of-domain text by default)."""
    tasks = list(cfg.tasks)
    if tasks and reference_text is not None and REFERENCE not in tasks:
        tasks.append(REFERENCE)
    return tasks


def check_reference(reference_text: str | None, data_source: str | None = None) -> str:
    """Preflight: eval.reference_text names readable .txt/.jsonl text that is not the training source.
    ConfigError naming eval.reference_text (exit 2) otherwise."""
    from kd.evaluate.bundled_tasks import reference_files

    if reference_text is None:
        return "no reference text (eval.reference_text: null)"
    files = reference_files(reference_text)
    if data_source and not data_source.startswith("hf-dataset:"):
        from kd.bundled import contains

        try:
            inside = contains(data_source, files)
        except Exception:  # noqa: BLE001 - data.source is checked (and named) by its own preflight check
            inside = False
        if inside:
            raise ConfigError(f"eval.reference_text {reference_text!r} is (inside) the training data "
                              f"data.source {data_source!r}: the out-of-domain score needs a source the run does "
                              "not train on; give another text or null")
    size = sum(f.stat().st_size for f in files)
    return f"reference text {reference_text}: {len(files)} file(s), {size:,} bytes (scored as {REFERENCE})"


def _task_manager(include_paths: list[str], bundled_dir: str | Path | None = None, *, defaults: bool = True):
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser().resolve()) for p in include_paths]
    if bundled_dir is not None:
        paths.insert(0, str(bundled_dir))
    return TaskManager(include_path=paths or None, include_defaults=defaults)


def _data_files(cfg: dict, yaml_path: Path | None) -> list[Path]:
    files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) or {}
    vals = files.values() if isinstance(files, dict) else [files]
    out = []
    for v in vals:
        for f in ([v] if isinstance(v, str) else list(v)):
            p = Path(f).expanduser()
            if not p.is_absolute() and yaml_path is not None and not p.exists():
                p = yaml_path.parent / p  # relative to the YAML's folder when not to the working directory
            out.append(p)
    return out


def _hub_cached(dataset: str) -> bool:
    """The data set is in a local Hugging Face cache (hub snapshot or `datasets` cache)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    try:
        import datasets.config

        ds = Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    except Exception:  # noqa: BLE001 - no datasets cache configured
        ds = None
    return (hub / "snapshots").is_dir() or (ds is not None and ds.is_dir())


def _offline_problem(name: str, entry, tm, seen: set[str]) -> str | None:
    """Why task `name` cannot run offline, or None when it can."""
    from lm_eval.tasks._index import Kind

    if name in seen:
        return None
    seen.add(name)
    if entry.kind in (Kind.GROUP, Kind.TAG):
        members = [t for t in (entry.cfg or {}).get("task", []) if isinstance(t, str)] if entry.kind == Kind.GROUP \
            else [n for n, e in tm.task_index.items() if name in (e.tags or ())]
        for m in members:
            sub = tm.task_index.get(m)
            why = f"member {m} is not a known task" if sub is None else _offline_problem(m, sub, tm, seen)
            if why:
                return why
        return None
    cfg = entry.cfg or {}
    dataset = cfg.get("dataset_path")
    if not dataset:
        return "its YAML names no dataset_path (a Python-defined task: kdflow cannot tell whether its data is offline)"
    if dataset in LOCAL_BUILDERS:
        files = _data_files(cfg, entry.yaml_path)
        missing = [str(p) for p in files if not p.exists()]
        if not files:
            return f"dataset_path {dataset} without dataset_kwargs.data_files"
        return f"data file {missing[0]} does not exist" if missing else None
    if Path(str(dataset)).expanduser().exists():
        return None
    return None if _hub_cached(dataset) else (
        f"its data set {dataset} is not in the local Hugging Face cache (lm-eval would download it; "
        "download it first, or give the task as a local YAML with dataset_path: json)")


def check_tasks(cfg: BenchmarksConfig) -> str:
    """Preflight: every listed task is a bundled task or an lm-eval task whose data is offline.

    Raises ConfigError naming the task (exit 2). Bundled tasks are always available (they are written
    from the prepared data); the lm-eval task index (~30 s) is read only when other tasks are listed."""
    if not cfg.tasks:
        return "no benchmarks"
    for p in cfg.include_paths:
        if not Path(p).expanduser().is_dir():
            raise ConfigError(f"eval.benchmarks.include_paths: {p} is not a folder")
    ext = _external(cfg)
    for name in cfg.limits:
        if name not in cfg.tasks and name != REFERENCE:
            raise ConfigError(f"eval.benchmarks.limits.{name}: {name} is not in eval.benchmarks.tasks")
    if ext:
        # the include paths alone first (fast); lm-eval's whole registry (~15k tasks) only for names not there
        tm = _task_manager(cfg.include_paths, defaults=False) if cfg.include_paths else None
        if tm is None or any(name not in tm.task_index for name in ext):
            tm = _task_manager(cfg.include_paths)
        for name in ext:
            entry = tm.task_index.get(name)
            if entry is None:
                raise ConfigError(f"eval.benchmarks.tasks: unknown lm-eval task {name!r} (not in lm-eval "
                                  f"{lm_eval_version()}'s registry nor in eval.benchmarks.include_paths; "
                                  f"bundled: {', '.join(BUNDLED)})")
            why = _offline_problem(name, entry, tm, set())
            if why:
                raise ConfigError(f"eval.benchmarks.tasks: task {name!r} has no offline data: {why}")
    return f"{len(cfg.tasks)} task(s) available offline: {', '.join(cfg.tasks)}"


def definitions_fingerprint(cfg: BenchmarksConfig, reference_text: str | None = None) -> str:
    """Cache-key part: the task YAMLs and data files found in include_paths, the bundled tasks' code and
    data, the reference text's content (when scored), the lm-eval version and the benchmark config.
    Registry tasks are named by the version."""
    ref = reference_text if REFERENCE in scored_tasks(cfg, reference_text) else None
    h = hashlib.sha256(json.dumps({"lm_eval": lm_eval_version(), "cfg": cfg.model_dump(mode="json"),
                                   "bundled": code_fingerprint(), "reference": ref,
                                   "reference_sha256": reference_fingerprint(ref)}, sort_keys=True).encode())
    for p in cfg.include_paths:
        root = Path(p).expanduser()
        for f in sorted(root.rglob("*")) if root.is_dir() else []:
            if f.is_file() and f.suffix in (".yaml", ".yml", ".json", ".jsonl", ".csv", ".parquet", ".txt", ".py"):
                h.update(str(f.relative_to(root)).encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def plan_estimate(cfg: BenchmarksConfig, *, heldout_bytes: int | None, params: int | None, cuda: bool,
                  reference_text: str | None = None) -> dict:
    """The plan's line: documents per task (limit, or an estimate from the held-out bytes) and a rough time."""
    from kd.evaluate.bundled_tasks import BPB, LASTWORD, MC, MC_DATA, MAX_PASSAGE_WORDS, REFERENCE_MAX_PASSAGES

    per_doc_tokens = {LASTWORD: 60, BPB: MAX_PASSAGE_WORDS * 1.4, MC: 4 * 20, REFERENCE: MAX_PASSAGE_WORDS * 1.4}
    docs: dict[str, int | None] = {}
    tasks = scored_tasks(cfg, reference_text)
    for t in tasks:
        est = None
        if t == REFERENCE:
            est = REFERENCE_MAX_PASSAGES
        elif t == MC:
            est = sum(1 for line in MC_DATA.read_text().splitlines() if line.strip())
        elif t == LASTWORD and heldout_bytes:
            est = heldout_bytes // 130  # about one item per sentence
        elif t == BPB and heldout_bytes:
            est = max(1, heldout_bytes // (MAX_PASSAGE_WORDS * 6))
        lim = cfg.limits.get(t, cfg.limit)
        docs[t] = min(est, lim) if est is not None and lim is not None else (lim if lim is not None else est)
    tokens = sum((n or 0) * per_doc_tokens.get(t, 100) for t, n in docs.items())
    seconds = None
    if params:
        flops = 3 * 2 * params * tokens  # three models, a forward pass is ~2·params FLOPs per token
        seconds = flops / (2e13 if cuda else 3e10) + 5 * len(tasks) * 3  # + per-task set-up
    return {"tasks": tasks, "docs": docs, "estimate_s": seconds}


# ------------------------------------------------------------------------------------ running
def _num(x) -> float | None:
    if x in _STDERR_SKIP or isinstance(x, str):
        return None
    return float(x)


def _definition_hash(task_cfg: dict) -> str:
    return hashlib.sha256(json.dumps(task_cfg, sort_keys=True, default=str).encode()).hexdigest()


def _groups(cfg: BenchmarksConfig, tasks: list[str] | None = None) -> dict[int | None, list[str]]:
    out: dict[int | None, list[str]] = {}
    for t in cfg.tasks if tasks is None else tasks:
        out.setdefault(cfg.limits.get(t, cfg.limit), []).append(t)
    return out


# metrics lm-eval aggregates as a ratio of sums over documents, (log-likelihood, bytes or words) per document,
# for which it reports no standard error: value of the aggregate from the summed log-likelihood per unit
_RATIO_METRICS = {"bits_per_byte": lambda wm: -wm / math.log(2), "byte_perplexity": lambda wm: np.exp(-wm),
                  "word_perplexity": lambda wm: np.exp(-wm)}


def bootstrap_stderr(pairs, metric: str, iters: int, seed: int = BOOTSTRAP_SEED) -> float | None:
    """Standard error of a ratio-of-sums metric (bits per byte, byte/word perplexity) by resampling documents:
    `pairs` = per-document (log-likelihood, bytes or words), as lm-eval logs them. None when fewer than two
    documents, no resamples, or the metric is not one of those."""
    if metric not in _RATIO_METRICS or iters < 2 or len(pairs) < 2:
        return None
    ll = np.asarray([float(p[0]) for p in pairs])
    units = np.asarray([float(p[1]) for p in pairs])
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(ll))
    out = []
    for start in range(0, iters, chunk):
        idx = rng.integers(0, len(ll), size=(min(chunk, iters - start), len(ll)))
        out.append(ll[idx].sum(1) / units[idx].sum(1))
    with np.errstate(over="ignore", invalid="ignore"):
        vals = _RATIO_METRICS[metric](np.concatenate(out))
    se = float(np.std(vals, ddof=1))
    return se if math.isfinite(se) else None


def _sample_pairs(samples: list[dict], metric: str, filt: str) -> list:
    return [s[metric] for s in samples
            if s.get("filter", filt) == filt and isinstance(s.get(metric), (list, tuple)) and len(s[metric]) == 2]


def _per_document(samples: list[dict], metric: str, filt: str) -> dict[int, object]:
    """doc_id -> that document's value of `metric` (a number, or (log-likelihood, units) for a ratio metric)."""
    return {int(s["doc_id"]): (tuple(s[metric]) if isinstance(s[metric], (list, tuple)) else float(s[metric]))
            for s in samples if s.get("filter", filt) == filt and metric in s and "doc_id" in s}


def paired_benchmark_difference(kd: dict[int, object], control: dict[int, object], metric: str, *, iters: int,
                                confidence: float = 0.95, seed: int = BOOTSTRAP_SEED) -> BenchmarkDifference | None:
    """KD − control on one benchmark metric, with a paired bootstrap interval over the documents both scored: the
    same resampled documents for both students. A mean metric (accuracy) resamples per-document values; a
    ratio metric (bits per byte) resamples (log-likelihood, units) pairs and takes each arm's ratio of sums."""
    ids = sorted(set(kd) & set(control))
    if len(ids) < 2 or iters < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(iters, len(ids)))
    if metric in _RATIO_METRICS:
        f = _RATIO_METRICS[metric]
        arms = []
        for side in (kd, control):
            ll = np.asarray([float(side[i][0]) for i in ids])
            units = np.asarray([float(side[i][1]) for i in ids])
            arms.append((f(ll.sum() / units.sum()), f(ll[idx].sum(1) / units[idx].sum(1))))
    else:
        arms = []
        for side in (kd, control):
            v = np.asarray([float(side[i]) for i in ids])
            arms.append((float(v.mean()), v[idx].mean(1)))
    (k, kb), (c, cb) = arms
    with np.errstate(invalid="ignore"):
        low, high = np.quantile(kb - cb, [(1 - confidence) / 2, 1 - (1 - confidence) / 2]).tolist()
    return BenchmarkDifference(documents=len(ids), kd=float(k), control=float(c), difference=float(k - c),
                               low=float(low), high=float(high), confidence=confidence, bootstrap_iters=iters)


def score_model(model, tokenizer, cfg: BenchmarksConfig, tm, *, device,
                tasks: list[str] | None = None) -> tuple[dict, dict, dict]:
    """lm-eval on one in-memory model: ({task: {metric: (value, stderr)}}, {task: meta},
    {task: {metric: {doc_id: value}}}). A bits-per-byte-like metric's stderr, which lm-eval leaves out, is
    bootstrapped over its per-document results; the per-document values pair two students document by document."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap stderr in-process (no fork of a big process)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=cfg.max_length, batch_size=cfg.batch_size,
              device=str(device))
    scores: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    docs: dict[str, dict] = {}
    for limit, names in _groups(cfg, tasks).items():
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, log_samples=True,
                              bootstrap_iters=cfg.bootstrap_iters, random_seed=0, numpy_random_seed=1234,
                              torch_random_seed=1234, fewshot_random_seed=1234)
        for task, row in res["results"].items():
            hib = res.get("higher_is_better", {}).get(task, {})
            scores[task], docs[task] = {}, {}
            logged = (res.get("samples") or {}).get(task, [])
            for key, v in row.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                if _num(v) is None:
                    continue
                se = _num(row.get(f"{metric}_stderr,{filt}"))
                if se is None and metric in _RATIO_METRICS:  # lm-eval gives none: bootstrap over documents
                    se = bootstrap_stderr(_sample_pairs(logged, metric, filt), metric, cfg.bootstrap_iters)
                scores[task][metric] = (float(v), se, bool(hib.get(metric, True)))
                docs[task][metric] = _per_document(logged, metric, filt)
            n = res.get("n-samples", {}).get(task, {})
            meta[task] = {"n_docs": int(n.get("effective", 0)), "n_available": int(n.get("original", 0)),
                          "version": str(res.get("versions", {}).get(task)),
                          "definition_sha256": _definition_hash(res.get("configs", {}).get(task, {})),
                          "limit": limit}
    return scores, meta, docs


def retention(after: float, teacher: float, higher_is_better: bool) -> float | None:
    """after ÷ teacher (higher is better) or teacher ÷ after (lower is better); None when undefined."""
    if not higher_is_better and math.isinf(after) and math.isfinite(teacher):
        return 0.0  # an infinitely perplexed student keeps nothing of a finite teacher
    num, den = (after, teacher) if higher_is_better else (teacher, after)
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return None
    return num / den


def run_benchmarks(models: dict, tokenizer_dirs: dict[str, str], cfg: BenchmarksConfig, *,
                   bundled_dir: str | Path | None, device="cpu", log: Callable[[str], None] = print,
                   reference_dir: str | Path | None = None, reference_text: str | None = None) -> BenchmarkReport:
    """Every task in `cfg.tasks` for each model in `models` (teacher, student_before, student_after), and
    kdflow_bpb_reference when `reference_dir` (write_reference_task's folder) is given."""
    from transformers import AutoTokenizer

    t_all = time.perf_counter()
    tasks = list(cfg.tasks) + ([REFERENCE] if reference_dir is not None and REFERENCE not in cfg.tasks else [])
    tm = _task_manager(cfg.include_paths + ([str(reference_dir)] if reference_dir is not None else []), bundled_dir,
                       defaults=bool(_external(cfg)))
    values: dict[tuple[str, str, str], tuple] = {}
    per_doc: dict[tuple[str, str, str], dict] = {}
    metas: dict[str, dict] = {}
    wall: dict[str, float] = {}
    for i, (name, model) in enumerate(models.items()):
        t0 = time.perf_counter()
        log(f"benchmarks: {name} ({i + 1}/{len(models)}) on {', '.join(tasks)}")
        tok = AutoTokenizer.from_pretrained(tokenizer_dirs[name])
        scores, meta, docs = score_model(model, tok, cfg, tm, device=device, tasks=tasks)
        for task, metrics in scores.items():
            for metric, v in metrics.items():
                values[(task, metric, name)] = v
                per_doc[(task, metric, name)] = docs.get(task, {}).get(metric, {})
        metas.update(meta)
        wall[name] = time.perf_counter() - t0
        summary = "; ".join(f"{t} " + ", ".join(f"{m}={v[0]:.4g}" for m, v in ms.items()) for t, ms in scores.items())
        log(f"benchmarks: {name} done in {wall[name]:.1f} s: {summary}")
    rows = []
    for (task, metric) in sorted({(t, m) for t, m, _ in values}):
        per = {n: values.get((task, metric, n)) for n in models}
        hib = next(v[2] for v in per.values() if v is not None)
        t, a = per.get("teacher"), per.get("student_after")
        vs_control = None
        if "student_after" in models and "control" in models:  # eval.control: KD − fine-tuning, paired by document
            vs_control = paired_benchmark_difference(per_doc.get((task, metric, "student_after"), {}),
                                                     per_doc.get((task, metric, "control"), {}), metric,
                                                     iters=cfg.bootstrap_iters)
        rows.append(BenchmarkScore(
            task=task, metric=metric, higher_is_better=hib,
            values={n: v[0] for n, v in per.items() if v is not None},
            stderr={n: v[1] for n, v in per.items() if v is not None},
            retention=retention(a[0], t[0], hib) if t is not None and a is not None else None,
            kd_minus_control=vs_control,
        ))
    ran = [BenchmarkTask(task=t, **metas[t], bundled=t in BUNDLED) for t in tasks if t in metas]
    wall["total"] = time.perf_counter() - t_all
    return BenchmarkReport(lm_eval_version=lm_eval_version(), tasks=ran, scores=rows, wall_s=wall,
                           bundled_dir=str(bundled_dir) if bundled_dir is not None else None,
                           max_length=cfg.max_length,
                           reference_text=reference_text if reference_dir is not None else None,
                           reference_dir=str(reference_dir) if reference_dir is not None else None)


# ------------------------------------------------------------------------------------ gates
def _better_or_equal(after: float, before: float, hib: bool) -> bool:
    return after >= before if hib else after <= before  # NaN compares false: fails closed


def benchmark_gates(report: BenchmarkReport | None, cfg: BenchmarksConfig) -> list[Falsifier]:
    """The optional benchmark falsifiers, from recorded numbers only (kd/evidence/verdicts.py recomputes them)."""
    if report is None:
        return []
    out = []
    missing = [t for t in cfg.tasks if t not in {x.task for x in report.tasks}]
    # the listed tasks and what the eval step added (kdflow_bpb_reference): the gates read every recorded score
    listed = list(cfg.tasks) + [t.task for t in report.tasks if t.task not in cfg.tasks]
    if cfg.require_no_regression:
        bad, seen = [], []
        for s in report.scores:
            b, a = s.values.get("student_before"), s.values.get("student_after")
            seen.append(f"{s.task}.{s.metric} {_f(b)}→{_f(a)}")
            if b is None or a is None or not _better_or_equal(a, b, s.higher_is_better):
                bad.append(f"{s.task}.{s.metric} before {_f(b)}, after {_f(a)}")
        bad += [f"{t}: no scores" for t in missing]
        out.append(Falsifier(
            id=NO_REGRESSION_ID,
            claim=f"student-after scores at least as well as student-before on every metric of {', '.join(listed)}",
            observed=("; ".join(seen) if not bad else "WORSE: " + "; ".join(bad)) if (seen or bad) else "no scores",
            verdict="pass" if seen and not bad else "fail"))
    if cfg.min_retention is not None:
        bad, seen, undefined = [], [], []
        for s in report.scores:
            if s.retention is None:
                undefined.append(f"{s.task}.{s.metric}")
                continue
            seen.append(f"{s.task}.{s.metric} {s.retention:.4g}")
            if not s.retention >= cfg.min_retention:
                bad.append(f"{s.task}.{s.metric} {s.retention:.4g}")
        bad += [f"{t}: no scores" for t in missing]
        note = f" (undefined, teacher scores 0 or not finite: {', '.join(undefined)})" if undefined else ""
        out.append(Falsifier(
            id=RETENTION_ID,
            claim=f"student-after retains ≥ {cfg.min_retention:g} of the teacher's score on every benchmark metric "
            "(after÷teacher, teacher÷after when lower is better)",
            observed=("; ".join(seen) if not bad else "BELOW: " + "; ".join(bad)) + note,
            verdict="pass" if seen and not bad else "fail"))
    return out


def _f(x: float | None) -> str:
    return "None" if x is None else f"{x:.4g}"


def value_pm(value: float | None, stderr: float | None) -> str:
    """`1.234 ± 0.0567` (the standard error), or the value alone when there is none."""
    return _f(value) + (f" ± {stderr:.3g}" if value is not None and stderr is not None else "")


def domain_line(report: BenchmarkReport) -> str | None:
    """Specialisation and retention side by side: student-after's bits per byte and retention on held-out text
    of the training source (kdflow_bpb) and on the reference text it did not train on (kdflow_bpb_reference)."""
    from kd.evaluate.bundled_tasks import BPB

    by = {s.task: s for s in report.scores if s.metric == "bits_per_byte"}
    parts = []
    for task, what in ((BPB, "in-domain (held-out training source)"),
                       (REFERENCE, f"out-of-domain ({report.reference_text or 'reference text'}, not trained on)")):
        s = by.get(task)
        if s is not None:
            parts.append(f"{what} {task}: student-after {value_pm(s.values.get('student_after'), s.stderr.get('student_after'))} "
                         f"bits/byte, teacher {value_pm(s.values.get('teacher'), s.stderr.get('teacher'))}, "
                         f"retention {_f(s.retention)}")
    return "; ".join(parts) if parts else None


def benchmarks_markdown(report: BenchmarkReport) -> str:
    """The table a user reads: task, metric, teacher, before, after (± standard error), retention, n docs;
    above it, in-domain and out-of-domain bits per byte side by side."""
    line = domain_line(report)
    control = any(s.kd_minus_control is not None or "control" in s.values for s in report.scores)
    head = "| task | metric | teacher | student-before | student-after | retention |" + \
        (" control | KD − control [interval] |" if control else "") + " docs |"
    lines = ([line, ""] if line else []) + [head, "|---" * (head.count("|") - 1) + "|"]
    n = {t.task: t.n_docs for t in report.tasks}
    for s in report.scores:
        arrow = "↑" if s.higher_is_better else "↓"
        v, se = s.values, s.stderr
        row = (f"| {s.task} | {s.metric} {arrow} | {value_pm(v.get('teacher'), se.get('teacher'))} | "
               f"{value_pm(v.get('student_before'), se.get('student_before'))} | "
               f"{value_pm(v.get('student_after'), se.get('student_after'))} | {_f(s.retention)} |")
        if control:
            d = s.kd_minus_control
            row += (f" {value_pm(v.get('control'), se.get('control'))} | " +
                    (f"{d.difference:+.4g} [{d.low:+.4g}, {d.high:+.4g}] |" if d is not None else "– |"))
        lines.append(row + f" {n.get(s.task, '?')} |")
    return "\n".join(lines)


def benchmark_eval(report, models: dict, tokenizer_dirs: dict[str, str], eval_cfg, *, heldout_path: str | Path,
                   device="cpu", log: Callable[[str], None] = print):
    """Score every model in `models` and attach the report and its gates to the `EvalReport`."""
    bench = score_benchmarks(models, tokenizer_dirs, eval_cfg, student_dir=tokenizer_dirs["student_after"],
                             heldout_path=heldout_path, device=device, log=log)
    return report if bench is None else with_benchmarks(report, bench, eval_cfg, log=log)


def score_benchmarks(models: dict, tokenizer_dirs: dict[str, str], eval_cfg, *, student_dir: str | Path,
                     heldout_path: str | Path, device="cpu", log: Callable[[str], None] = print) -> BenchmarkReport | None:
    """The eval step's benchmark part for `models`: write the bundled tasks (from the prepared set training read,
    tokenized by the student's tokenizer) and the reference task, score each model; None when no task is listed."""
    from kd.errors import DataError
    from kd.evaluate.bundled_tasks import write_bundled_tasks, write_reference_task

    cfg = eval_cfg.benchmarks
    if not cfg.tasks or not models:
        return None
    reference_text = getattr(eval_cfg, "reference_text", None)
    tasks = scored_tasks(cfg, reference_text)
    bundled_dir = reference_dir = None
    if any(t in BUNDLED for t in tasks):
        if not Path(heldout_path).is_dir():
            raise DataError(f"bundled benchmarks need a prepared data folder; {heldout_path} is not one "
                            "(an older run's held-out blocks): run again with --no-cache")
    if any(t in BUNDLED and t != REFERENCE for t in tasks):
        bundled_dir = write_bundled_tasks(heldout_path, student_dir)
        log(f"benchmarks: bundled tasks in {bundled_dir}")
        _refuse_empty(bundled_dir, [t for t in tasks if t in BUNDLED and t != REFERENCE])
    if REFERENCE in tasks:  # out of domain: the reference text, decontaminated against the training split
        reference_dir = write_reference_task(heldout_path, student_dir, reference_text)
        log(f"benchmarks: {REFERENCE} ({reference_text}) in {reference_dir}")
    return run_benchmarks(models, tokenizer_dirs, cfg.model_copy(update={"tasks": [t for t in tasks if t != REFERENCE]}),
                          bundled_dir=bundled_dir, device=device, log=log, reference_dir=reference_dir,
                          reference_text=reference_text)


def _refuse_empty(bundled_dir: Path, tasks: list[str]) -> None:
    """A bundled task left with no items fails here, naming it and why, not as a StopIteration inside lm-eval."""
    from kd.errors import DataError
    from kd.evaluate.bundled_tasks import MARKER, bundled_info

    info = bundled_info(bundled_dir)
    empty = [t for t in tasks if info["docs"].get(t, 0) == 0]
    if empty:
        raise DataError(
            f"eval.benchmarks.tasks: {', '.join(empty)} got no items from the held-out split: "
            f"{info['heldout_documents']} held-out documents, {info['duplicates_of_training_dropped']} dropped as "
            f"copies of training documents, {info['items_found_in_training_dropped']} items dropped as found in the "
            f"training text ({Path(bundled_dir) / MARKER}); raise data.heldout_fraction or leave the task out")


def merge_benchmarks(base: BenchmarkReport | None, more: BenchmarkReport) -> BenchmarkReport:
    """One report from two sets of models scored on the same tasks (the baselines once, then each trained
    student): values side by side, retention recomputed from the merged teacher and student-after values."""
    if base is None:
        return more
    rows = []
    by_key = {(s.task, s.metric): s for s in base.scores}
    for s in more.scores:
        b = by_key.pop((s.task, s.metric), None)
        values, stderr = {**(b.values if b else {}), **s.values}, {**(b.stderr if b else {}), **s.stderr}
        t, a = values.get("teacher"), values.get("student_after")
        rows.append(s.model_copy(update={"values": values, "stderr": stderr, "retention": retention(
            a, t, s.higher_is_better) if t is not None and a is not None else None}))
    rows += list(by_key.values())
    tasks = list({t.task: t for t in [*base.tasks, *more.tasks]}.values())
    wall = {**base.wall_s, **more.wall_s, "total": base.wall_s.get("total", 0.0) + more.wall_s.get("total", 0.0)}
    return more.model_copy(update={"scores": sorted(rows, key=lambda r: (r.task, r.metric)), "tasks": tasks,
                                   "wall_s": wall})


def with_benchmarks(report, bench: BenchmarkReport, eval_cfg, *, log: Callable[[str], None] = print):
    """`report` with `bench` attached and the benchmark gates recomputed from it."""
    if line := domain_line(bench):
        log(f"benchmarks: {line}")
    gates = [g for g in report.gates if g.id not in (NO_REGRESSION_ID, RETENTION_ID)] + \
        benchmark_gates(bench, eval_cfg.benchmarks)
    return report.model_copy(update={"benchmarks": bench, "gates": gates})
