"""Layer-pruned students: the teacher's embeddings, chosen decoder layers, final norm and head.

    kdflow make-student OUT --from TEACHER --keep-layers 10      # or --layers 0,3,6,...
    from kd.prune import choose_layers, make_student, ensure_pruned
    make_student(teacher_dir, out, layers=choose_layers(30, 10))  # a HF folder AutoModelForCausalLM loads
    folder, init = ensure_pruned(teacher_snapshot, spec)          # cached under $KDFLOW_HOME/pruned/

Depth pruning is the usual start for a distilled student (DistilBERT keeps every other layer;
Minitron prunes depth then distils): the kept layers already speak the teacher's hidden
language, so KD only has to repair the gaps. The student is a config copy of the teacher with
`num_hidden_layers` (and any per-layer lists such as `layer_types`) cut to the kept layers; its
weights are the teacher's, renumbered. Keeping every layer reproduces the teacher exactly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kd.config import PruneSpec
from kd.build_once import build_once
from kd.errors import ModelError
from kd.hashing import digest_of
from kd.model_build_lock import MODEL_BUILD_LOCK
from kd.results import ModelSnapshot, PrunedInit

INFO_FILE = "kdflow-pruned.json"
PRUNED_FORMAT = 1  # bump when the pruned layout changes, so cached students are rebuilt
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "tokenizer.model", "chat_template.jinja", "generation_config.json")


def choose_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced, first and last included: (30, 10) -> 0,3,6,10,...,29."""
    if not 0 < keep <= total:
        raise ModelError(f"keep_layers must be between 1 and the teacher's {total} layers, got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


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
                 keep_layers: int | None = None) -> list[int]:
    """Write a pruned copy of the HF model in `teacher_dir` to `out`; returns the kept layer indices."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from backends import get_backend

    teacher_dir, out = Path(teacher_dir), Path(out)
    teacher = get_backend("hf").load(teacher_dir, dtype=None)  # the stored dtype: no rounding on the way
    total = _num_layers(teacher.config)
    spec = PruneSpec(keep_layers=keep_layers, layers=layers)
    kept = resolve_layers(spec, total)

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
    (out / INFO_FILE).write_text(json.dumps(
        {"teacher_dir": str(teacher_dir), "teacher_layers": total, "layers": kept, "format": PRUNED_FORMAT},
        indent=2) + "\n")
    return kept


def ensure_pruned(teacher: ModelSnapshot, spec: PruneSpec) -> tuple[Path, PrunedInit]:
    """The pruned student of snapshot `teacher`, made once under $KDFLOW_HOME/pruned/ (content-addressed)."""
    from transformers import AutoConfig

    from kd.gguf import kdflow_home

    total = _num_layers(AutoConfig.from_pretrained(teacher.local_dir))
    kept = resolve_layers(spec, total)
    init = PrunedInit(teacher_content_hash=teacher.content_hash, teacher_layers=total, layers=kept)
    key = digest_of({"teacher": init.teacher_content_hash, "layers": ",".join(map(str, kept)),
                     "format": str(PRUNED_FORMAT)})
    out = kdflow_home() / "pruned" / f"{key[:20]}-{len(kept)}of{total}"
    build_once(out, INFO_FILE, lambda tmp: make_student(teacher.local_dir, tmp, layers=kept))
    return out, init


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
