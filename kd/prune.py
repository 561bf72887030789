"""Layer-pruned students: the teacher's embeddings, chosen decoder layers, final norm and head.

    kdflow make-student OUT --from TEACHER --keep-layers 10      # measured on bundled:english; or --layers 0,3,6,...
    from kd.prune import choose_layers, make_student, ensure_pruned
    make_student(teacher_dir, out, layers=choose_layers(30, 10))  # a HF folder AutoModelForCausalLM loads
    make_student(teacher_dir, out, keep_layers=10, strategy="measured", calibration=calib)  # kd/layer_choice.py
    folder, init = ensure_pruned(teacher_snapshot, spec, data)    # cached under $KDFLOW_HOME/pruned/

Depth pruning is the usual start for a distilled student (DistilBERT keeps every other layer;
Minitron prunes depth then distils): the kept layers already speak the teacher's hidden
language, so KD only has to repair the gaps. The student is a config copy of the teacher with
`num_hidden_layers` (and any per-layer lists such as `layer_types`) cut to the kept layers; its
weights are the teacher's, renumbered. Keeping every layer reproduces the teacher exactly.

Which layers (`strategy`, kd/layer_choice.py): `measured` (the default) removes layers greedily by their measured
effect on calibration text (the run's prepared training split in a run; `--calibration`, default
bundled:english, for make-student); `block-influence` keeps the largest 1 - cos(h_in, h_out); `even` spaces them
evenly. The per-layer scores and the calibration's sha256 go into INFO_FILE and the student's `init`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from kd.config import PruneSpec
from kd.build_once import build_once
from kd.errors import ModelError
from kd.hashing import digest_of
from kd.layer_choice import choose_layers
from kd.model_build_lock import MODEL_BUILD_LOCK
from kd.results import ModelSnapshot, PrunedInit

INFO_FILE = "kdflow-pruned.json"
DEFAULT_CALIBRATION = "bundled:english"  # make-student's calibration text when none is given
PRUNED_FORMAT = 1  # bump when the pruned layout changes, so cached students are rebuilt
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "tokenizer.model", "chat_template.jinja", "generation_config.json")


def resolve_layers(spec: PruneSpec, total: int) -> list[int]:
    if spec.keep_layers is not None:
        return choose_layers(total, spec.keep_layers)
    layers = list(spec.layers or [])
    bad = [i for i in layers if i >= total]
    if bad:
        raise ModelError(f"layers {bad} do not exist: the teacher has layers 0..{total - 1}")
    return layers


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ModelError(f"{type(config).__name__} has no num_hidden_layers: cannot depth-prune this model")
    return n


def make_student(teacher_dir: str | Path, out: str | Path, *, layers: list[int] | None = None,
                 keep_layers: int | None = None, strategy: str = "even", calibration=None) -> list[int]:
    """Write a pruned copy of the HF model in `teacher_dir` to `out`; returns the kept layer indices.

    `keep_layers` are chosen by `strategy` (kd/layer_choice.py); a measured strategy scores layers on
    `calibration` (a kd.layer_choice.Calibration; default: the start of DEFAULT_CALIBRATION)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from backends import get_backend

    teacher_dir, out = Path(teacher_dir), Path(out)
    teacher = get_backend("hf").load(teacher_dir, dtype=None)  # the stored dtype: no rounding on the way
    total = _num_layers(teacher.config)
    spec = PruneSpec(keep_layers=keep_layers, layers=layers, strategy=strategy)
    info = {"teacher_dir": str(teacher_dir), "teacher_layers": total}
    if spec.measured:
        from kd.layer_choice import calibration_from_text, measure_layers

        choose_layers(total, keep_layers)  # the range check first: no measuring for an impossible count
        if calibration is None:
            calibration = calibration_from_text(DEFAULT_CALIBRATION, teacher_dir)
        choice = measure_layers(teacher, calibration, keep_layers, strategy)
        kept = choice.layers
        info.update(strategy=strategy, scores=choice.scores, calibration=choice.calibration,
                    full_loss=choice.full_loss, kept_loss=choice.kept_loss, choose_wall_s=choice.wall_s)
    else:
        kept = resolve_layers(spec, total)
        info["strategy"] = "given" if layers is not None else "even"

    blocks = teacher.get_decoder().layers
    prefix = next(name for name, mod in teacher.named_modules() if mod is blocks)  # e.g. model.layers
    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):  # per-layer settings (layer_types, ...) follow the layers
        if isinstance(value, list) and len(value) == total and key not in ("architectures",):
            setattr(config, key, [value[i] for i in kept])
    renumber = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key, tensor in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(1)) in renumber:
            state[f"{prefix}.{renumber[int(m.group(1))]}.{key[m.end():]}"] = tensor
    with MODEL_BUILD_LOCK, torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    student.load_state_dict(state, strict=True, assign=True)  # every student weight comes from the teacher
    student.tie_weights()
    student.generation_config = teacher.generation_config
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    for name in _COPIED:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    (out / INFO_FILE).write_text(json.dumps({**info, "layers": kept, "format": PRUNED_FORMAT}, indent=2) + "\n")
    return kept


def ensure_pruned(teacher: ModelSnapshot, spec: PruneSpec, data=None) -> tuple[Path, PrunedInit]:
    """The pruned student of snapshot `teacher`, made once under $KDFLOW_HOME/pruned/ (content-addressed on the
    teacher, the layers or the strategy, and the calibration tokens). A measured strategy calibrates on the
    training split of `data` (a DataConfig: the run's prepared set, tokenised with the teacher's tokenizer,
    which the student shares, so prepare_data reuses it) or, without `data`, on DEFAULT_CALIBRATION."""
    from transformers import AutoConfig

    from kd.gguf import kdflow_home

    total = _num_layers(AutoConfig.from_pretrained(teacher.local_dir))
    calib = None
    if spec.measured:
        from kd.layer_choice import METHOD_VERSION

        choose_layers(total, spec.keep_layers)
        calib = calibration_for(teacher.local_dir, spec, data)
        what = {"strategy": spec.strategy, "keep": str(spec.keep_layers), "calibration": calib.sha256,
                "method": str(METHOD_VERSION)}
        n = spec.keep_layers
        build = lambda tmp: make_student(teacher.local_dir, tmp, keep_layers=n, strategy=spec.strategy,  # noqa: E731
                                         calibration=calib)
    else:
        kept = resolve_layers(spec, total)
        what, n = {"layers": ",".join(map(str, kept))}, len(kept)
        build = lambda tmp: make_student(teacher.local_dir, tmp, layers=kept)  # noqa: E731
    key = digest_of({"teacher": teacher.content_hash, **what, "format": str(PRUNED_FORMAT)})
    out = kdflow_home() / "pruned" / f"{key[:20]}-{n}of{total}"
    build_once(out, INFO_FILE, build)
    return out, pruned_init(teacher.content_hash, json.loads((out / INFO_FILE).read_text()))


def pruned_init(teacher_content_hash: str, info: dict) -> PrunedInit:
    """The manifest's record of a pruned student, from its INFO_FILE."""
    fields = ("strategy", "scores", "calibration", "full_loss", "kept_loss")
    return PrunedInit(teacher_content_hash=teacher_content_hash, teacher_layers=info["teacher_layers"],
                      layers=info["layers"], **{k: info[k] for k in fields if info.get(k) is not None})


def calibration_for(teacher_dir: str | Path, spec: PruneSpec, data=None):
    """The calibration blocks of a measured choice: `spec.calibration_tokens` of `spec.calibration` (blocks of
    128 tokens) when given, else of the prepared training split of `data` (whole blocks), else of
    DEFAULT_CALIBRATION."""
    from kd.layer_choice import CALIBRATION_SEQ_LEN, calibration_from_prepared, calibration_from_text

    if spec.calibration is not None or data is None:
        return calibration_from_text(spec.calibration or DEFAULT_CALIBRATION, teacher_dir,
                                     n_blocks=math.ceil(spec.calibration_tokens / CALIBRATION_SEQ_LEN))
    from kd.data import model_max_positions, prepare_data

    prepared = prepare_data(data, teacher_dir, max_positions=model_max_positions(teacher_dir))
    return calibration_from_prepared(prepared.path, n_blocks=math.ceil(spec.calibration_tokens / data.seq_len))


def pruned_size_info(teacher_info: dict, spec: PruneSpec) -> dict:
    """Preflight: the student's size from the teacher's (params split evenly over its layers)."""
    layers, params = teacher_info.get("layers"), teacher_info.get("params")
    info = {k: teacher_info.get(k) for k in ("vocab_size", "hidden_size", "max_positions")}
    if not isinstance(layers, int) or params is None:
        return {**info, "params": None}
    keep = spec.keep_layers or len(spec.layers or [])
    emb = (teacher_info.get("vocab_size") or 0) * (teacher_info.get("hidden_size") or 0)
    per_layer = max(0, params - emb) / layers
    return {**info, "params": int(emb + per_layer * min(keep, layers)), "layers": keep}
