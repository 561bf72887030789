"""The `kdflow` command.

    kdflow smoke [--evidence-dir DIR] [--steps N]      tiny local models, embedded Prefect server
    kdflow run CONFIG [--set K=V ...] [--dry-run] [--no-cache] [--evidence-dir DIR]
    kdflow sweep SPEC.yaml [--concurrency N] [--evidence-dir DIR] [--dry-run]
    kdflow make-tiny OUT
    kdflow make-student OUT --from TEACHER (--keep-layers N | --layers 0,3,6)
    kdflow evidence verify|show RUN_DIR | diff A B | schema
    kdflow render-jobset CONFIG --image IMG [--set K=V ...] [--run-name N] [--gpus-per-node G] [--pvc CLAIM]

Exit codes: 0 success; 2 invalid input (config, model, tokenizer/vocab, data), one message naming
what is wrong; 1 any other failed run (failed gates included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kd.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE_PRESET = REPO_ROOT / "configs" / "smoke.yaml"


def _strategy_field():
    from kd.config import PruneSpec

    f = PruneSpec.model_fields["strategy"]
    from typing import get_args

    return get_args(f.annotation), f.default


STRATEGY_CHOICES, DEFAULT_STRATEGY = _strategy_field()  # make-student --strategy: the config's own values


def _quiet_prefect_env() -> None:
    """Nothing may leave 127.0.0.1: no analytics, no telemetry."""
    for k, v in (("DO_NOT_TRACK", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                 ("HF_HUB_DISABLE_TELEMETRY", "1"), ("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore"),
                 # a busy 2-core machine can take longer than the 20 s default to start the server
                 ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")):
        os.environ.setdefault(k, v)


class _InputErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; for invalid input (an InputError found
    after preflight, e.g. by the vocab check) the one-line message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], InputError):
            record.exc_info = record.exc_text = None
        return True


def _quiet_input_errors() -> None:
    quiet = _InputErrorsWithoutTraceback()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _InputErrorsWithoutTraceback) for f in handler.filters):
                handler.addFilter(quiet)


def _run_flow(cfg) -> int:
    _quiet_prefect_env()
    from flows.distill import distill

    _quiet_input_errors()  # after the import: Prefect has set up its log handlers by now
    result = distill(cfg)
    print(json.dumps(result, indent=2))
    return 0


def cmd_run(args) -> int:
    from kd.config import load_config
    from kd.preflight import format_plan, raise_if_failed, run_preflight

    overrides = list(args.set or [])
    if args.evidence_dir:
        overrides.append(f"evidence_dir={args.evidence_dir}")
    if args.no_cache:
        overrides.append("orchestration.refresh_cache=true")
    if getattr(args, "steps", None) is not None:  # --steps 0 is an error (train.steps > 0), not ignored
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    if cfg.name and not args.dry_run:  # a run folder is never reused: refused before any work (exit 2)
        from kd.evidence.manifest import ensure_new_run

        ensure_new_run(cfg.evidence_dir, cfg.work_dir, cfg.name)
    # preflight before Prefect starts: a bad input is one line naming it (exit 2), no flow-run traceback
    report = run_preflight(cfg)
    if args.dry_run:
        print(format_plan(report))
    raise_if_failed(report)
    return 0 if args.dry_run else _run_flow(cfg)


def cmd_sweep(args) -> int:
    """Validate the spec and every trial (exit 2 naming the field), preflight every trial, run the sweep flow."""
    from kd.sweep.spec import expand, load_spec, preflight_trials, sweep_dir

    spec = load_spec(args.spec)
    update = {k: v for k, v in (("concurrency", args.concurrency), ("evidence_dir", args.evidence_dir),
                                ("work_dir", args.work_dir)) if v is not None}
    if update:
        from kd.sweep.spec import validate_spec

        spec = validate_spec({**spec.model_dump(exclude_unset=True), **update}, where=f"{args.spec} (with options)")
    trials = expand(spec)
    if args.dry_run:
        print(f"sweep {spec.name}: {len(trials)} trials, {spec.concurrency} at once -> {sweep_dir(spec)}")
        for t in trials:
            print(f"  {t.name}: " + ", ".join(f"{k}={v}" for k, v in t.overrides.items()))
        return 0
    preflight_trials(trials)  # every trial's own config, before Prefect starts: one line naming a bad trial
    _quiet_prefect_env()
    from flows.sweep import sweep

    _quiet_input_errors()
    print(json.dumps(sweep(spec), indent=2))
    return 0


def cmd_smoke(args) -> int:
    args.config, args.dry_run = SMOKE_PRESET, False
    return cmd_run(args)


def cmd_make_student(args) -> int:
    """A depth-pruned student from TEACHER (any model source: folder, .gguf, pkg:, tiny:teacher, hub repo)."""
    from kd.config import ModelRef
    from kd.errors import ConfigError
    from kd.hub import pull_model
    from kd.prune import make_student

    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--layers: expected comma-separated layer numbers, got {args.layers!r}") from None
    try:
        ref = ModelRef(repo=args.teacher, gguf_file=args.gguf_file, revision=args.revision)
    except ValueError as err:
        raise ConfigError(f"--from: {err}") from None
    if layers is not None and (args.strategy is not None or args.calibration is not None):
        raise ConfigError("--strategy/--calibration: choose --keep-layers; --layers are kept exactly as given")
    strategy = args.strategy or DEFAULT_STRATEGY
    teacher = pull_model(ref, "teacher", dtype=args.dtype)
    calibration = None
    if args.keep_layers is not None and strategy != "even":
        import math

        from kd.layer_choice import CALIBRATION_SEQ_LEN, calibration_from_text
        from kd.prune import DEFAULT_CALIBRATION

        if args.calibration_tokens < 16:
            raise ConfigError(f"--calibration-tokens: must be >= 16, got {args.calibration_tokens}")
        calibration = calibration_from_text(args.calibration or DEFAULT_CALIBRATION, teacher.local_dir,
                                            n_blocks=math.ceil(args.calibration_tokens / CALIBRATION_SEQ_LEN))
    try:
        kept = make_student(teacher.local_dir, Path(args.out), layers=layers, keep_layers=args.keep_layers,
                            strategy=strategy, calibration=calibration)
    except ValueError as err:  # PruneSpec's own checks (e.g. layers not increasing)
        raise ConfigError(f"--layers/--keep-layers: {err}") from None
    how = f", strategy {strategy}, calibrated on {calibration.source}" if calibration is not None else ""
    print(f"student: {Path(args.out).resolve()} ({len(kept)} decoder layers of the teacher's: {kept}{how}; "
          f"scores in {Path(args.out).resolve() / 'kdflow-pruned.json'})")
    return 0


def cmd_make_tiny(args) -> int:
    from kd.tiny import make_tiny

    teacher, student = make_tiny(Path(args.out), seed=args.seed)
    print(f"teacher: {teacher}\nstudent: {student}")
    return 0


def cmd_evidence(args) -> int:
    from kd.evidence import manifest
    from kd.evidence.verify import verify_run_dir
    from kd.evidence.view import diff_runs, show_run

    if args.action == "schema":
        print(json.dumps(manifest.manifest_json_schema(), indent=2))
        return 0
    if args.action == "keygen":
        from kd.evidence.signing import fingerprint, generate_keypair, load_public_key

        private, public = generate_keypair(Path(args.key), Path(args.pubkey) if args.pubkey else None)
        print(f"private key: {private} (keep it secret)\npublic key:  {public} "
              f"(fingerprint {fingerprint(load_public_key(public))[:16]}…)")
        return 0
    if args.action == "show" and _is_sweep(Path(args.run_dir)):
        from kd.evidence.verify import verify_sweep_dir
        from kd.sweep.report import SUMMARY

        print((Path(args.run_dir) / SUMMARY).read_text(encoding="utf-8"))
        problems = verify_sweep_dir(Path(args.run_dir))
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        return 1 if problems else 0
    if args.action == "verify" and _is_sweep(Path(args.run_dir)):
        from kd.evidence.verify import verify_sweep_dir

        problems = verify_sweep_dir(Path(args.run_dir))
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        if not problems:
            print(f"ok: sweep {args.run_dir} verifies (every trial folder, each trial manifest's sha256, "
                  "the ranking and the best trial recomputed)")
        return 1 if problems else 0
    if args.action in ("verify", "show", "sign"):
        run_dir = Path(args.run_dir)
        if not (run_dir / manifest.MANIFEST).is_file():  # verify, show and sign agree: exit 2, one line
            raise manifest.EvidenceError(f"{run_dir}: run folder not found" if not run_dir.is_dir() else
                                         f"{run_dir}: no {manifest.MANIFEST} (not an evidence folder, or the run "
                                         "crashed before writing it)")
    if args.action == "verify":
        from kd.evidence.signing import check_signature

        problems = verify_run_dir(run_dir) + check_signature(run_dir, _key_path(args.pubkey))
        for p in problems:
            print(f"FAIL {p}", file=sys.stderr)
        if not problems:
            signed = " and the signature of " + args.pubkey if args.pubkey else ""
            print(f"ok: {run_dir} verifies (schema, every sha256, every verdict recomputed{signed})")
        return 1 if problems else 0
    if args.action == "sign":
        from kd.evidence.signing import sign_run

        problems = verify_run_dir(run_dir)
        if problems:  # a signature attests intact evidence; it is never put on a folder that fails
            for p in problems:
                print(f"FAIL {p}", file=sys.stderr)
            print(f"kdflow: not signed: {run_dir} does not verify", file=sys.stderr)
            return 1
        print(f"signed: {sign_run(run_dir, _key_path(args.key))}")
        return 0
    if args.action == "show":
        try:
            print(show_run(run_dir))
        except manifest.EvidenceInvalid as err:
            print(f"FAIL {err}", file=sys.stderr)
            return 1
        return 1 if verify_run_dir(run_dir) else 0
    print(diff_runs(Path(args.a), Path(args.b)))
    return 0


def _is_sweep(path: Path) -> bool:
    from kd.evidence.verify import is_sweep_dir

    return is_sweep_dir(path)


def cmd_render_jobset(args) -> int:
    """Print the ConfigMap + JobSet (YAML) of a multi-node training; see kd/jobset.py and docs/prefect.md."""
    import yaml

    from kd.config import load_config
    from kd.jobset import render_jobset

    cfg = load_config(args.config, list(args.set or []))
    run_name = args.run_name or cfg.name or Path(args.config).stem
    manifest = render_jobset(cfg, run_name=run_name, image=args.image, namespace=args.namespace, pvc=args.pvc,
                             gpus_per_node=args.gpus_per_node, shm_size=args.shm_size, max_restarts=args.max_restarts)
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def _key_path(path: str | None) -> Path | None:
    return Path(path) if path else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdflow", description="Knowledge distillation of causal LMs on Prefect 3.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_options(sp):
        sp.add_argument("--set", action="append", metavar="K=V", help="override a field, e.g. kd.alpha=0.5")
        sp.add_argument("--evidence-dir", help="where evidence/<run>/ goes")
        sp.add_argument("--no-cache", action="store_true", help="ignore cached task results")

    smoke = sub.add_parser("smoke", help="smoke distillation: tiny local models, embedded Prefect server")
    run_options(smoke)
    smoke.add_argument("--steps", type=int, help="training steps")
    smoke.set_defaults(func=cmd_smoke)

    run = sub.add_parser("run", help="run a distillation from a YAML preset")
    run.add_argument("config", help="configs/*.yaml")
    run_options(run)
    run.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    run.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="run a sweep: trials of a base run, ranked on an objective")
    sw.add_argument("spec", help="sweep spec YAML, e.g. configs/sweeps/smoke-alpha-temperature.yaml")
    sw.add_argument("--concurrency", type=int, help="trials running at once (overrides the spec)")
    sw.add_argument("--evidence-dir", help="where evidence/<sweep>/ goes (overrides the spec)")
    sw.add_argument("--work-dir", help="where runs/<sweep>/ goes (overrides the spec)")
    sw.add_argument("--dry-run", action="store_true", help="validate the spec, list the trials and stop")
    sw.set_defaults(func=cmd_sweep)

    ms = sub.add_parser("make-student", help="write a layer-pruned copy of a teacher (a HF folder) to OUT")
    ms.add_argument("out")
    ms.add_argument("--from", dest="teacher", required=True,
                    help="teacher: HF folder, .gguf file, pkg:DIST/FILE, tiny:teacher or hub repo id")
    keep = ms.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-layers", type=int, help="keep N decoder layers chosen by --strategy, first and last "
                      "included")
    keep.add_argument("--layers", help="keep exactly these decoder layers, e.g. 0,3,6,9")
    ms.add_argument("--strategy", choices=STRATEGY_CHOICES, help=f"how --keep-layers are chosen (default "
                    f"{DEFAULT_STRATEGY}): measured = greedy removal on calibration loss, block-influence = largest "
                    "1 - cos(h_in, h_out), even = evenly spaced (kd/layer_choice.py)")
    ms.add_argument("--calibration", help="text the layers are measured on: a .txt file (one document a line), a "
                    "folder of them or bundled:NAME (default bundled:english)")
    ms.add_argument("--calibration-tokens", type=int, default=512, help="calibration tokens (blocks of 128)")
    ms.add_argument("--gguf-file", help="GGUF file inside the hub repo given by --from")
    ms.add_argument("--revision", default="main", help="hub revision of --from")
    ms.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype a GGUF teacher is dequantized to (and the student is stored in)")
    ms.set_defaults(func=cmd_make_student)

    tiny = sub.add_parser("make-tiny", help="write OUT/teacher and OUT/student tiny models")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)

    ev = sub.add_parser("evidence", help="inspect evidence folders")
    evsub = ev.add_subparsers(dest="action", required=True)
    for name, text in (("verify", "check the schema, every sha256 and every verdict (recomputed); on a sweep "
                                  "folder, every trial and the ranking"),
                       ("show", "print a readable summary")):
        sp = evsub.add_parser(name, help=text)
        sp.add_argument("run_dir")
        if name == "verify":
            sp.add_argument("--pubkey", metavar="PUB.pem", help="also require a valid Ed25519 signature by this key")
    sg = evsub.add_parser("sign", help="sign a verified run's manifest (Ed25519, writes manifest.sig)")
    sg.add_argument("run_dir")
    sg.add_argument("--key", required=True, metavar="KEY.pem", help="Ed25519 private key (PEM)")
    kg = evsub.add_parser("keygen", help="write a new Ed25519 key pair for `evidence sign`")
    kg.add_argument("key", metavar="KEY.pem", help="private key path (the public key goes next to it: KEY.pub.pem)")
    kg.add_argument("--pubkey", metavar="PUB.pem", help="public key path")
    d = evsub.add_parser("diff", help="config and metric differences between two runs")
    d.add_argument("a")
    d.add_argument("b")
    evsub.add_parser("schema", help="print the manifest JSON Schema")
    ev.set_defaults(func=cmd_evidence)

    js = sub.add_parser("render-jobset", help="print a Kubernetes JobSet (YAML) training CONFIG on "
                        "train.rendezvous.nnodes nodes")
    js.add_argument("config", help="configs/*.yaml")
    js.add_argument("--set", action="append", metavar="K=V", help="override a field, e.g. train.rendezvous.nnodes=4")
    js.add_argument("--image", required=True, help="container image with kdflow at /opt/kdflow (CUDA torch)")
    js.add_argument("--run-name", help="run and JobSet name (default: the config's name, else the file's stem)")
    js.add_argument("--namespace", default="default")
    js.add_argument("--pvc", default="kdflow-shared", help="ReadWriteMany claim mounted at /shared on every node")
    js.add_argument("--gpus-per-node", type=int, help="nvidia.com/gpu per node (default: train.nproc_per_node)")
    js.add_argument("--shm-size", default="16Gi", help="memory-backed /dev/shm size")
    js.add_argument("--max-restarts", type=int, default=2, help="JobSet restarts of all nodes after a failure")
    js.set_defaults(func=cmd_render_jobset)
    return p


def exit_code(err: BaseException) -> int:
    """2 for invalid input (config, model, tokenizer/vocab, data: the user must change something), else 1."""
    return 2 if isinstance(err, InputError) else 1


def main(argv: list[str] | None = None) -> int:
    from kd.evidence.redact import shorten

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"kdflow: error: {shorten(str(err), 1500)}", file=sys.stderr)  # never a whole config/manifest
        return exit_code(err)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a failed run: name it, keep the traceback out of the one-line message
        print(f"kdflow: run failed: {type(err).__name__}: {shorten(str(err), 1500)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
