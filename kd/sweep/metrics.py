"""Which manifest paths can rank a sweep: every number manifest.json can hold, read off its schema.

    metric_problem("eval.on_samples.after.reverse_kl")   # None: a number of the manifest
    metric_problem("eval.student_after.kl")              # "... did you mean eval.student_after.kl_to_teacher?"
    numeric_paths()                                      # every such path (<key>: any key of a map)

The walk follows the pydantic models of kd/evidence/manifest.py (Manifest -> EvalReport -> OnSampleReport -> ...),
so a field added to the manifest can rank trials without this module changing. `config` is walked as
the RunConfig it holds; maps typed `dict[str, float]` take any key; a field typed as a bare `dict`
(training.on_policy: kd/train/objectives.py writes it) takes any sub-path, as its keys are not in
the schema. Lists (falsifiers, benchmark scores) have no dotted path: benchmark scores are ranked with
the `benchmarks.<task>[.<metric>]` shorthand instead.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

ANY_KEY = "<key>"


def _options(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly Optional / Union) annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_number(annotation: Any) -> bool:
    return annotation in (int, float)


def _children(annotation: Any, name: str) -> list[Any]:
    """What `name` under a field of type `annotation` is (empty: nothing there)."""
    from kd.config import RunConfig

    out = []
    for a in _options(annotation):
        if isinstance(a, type) and issubclass(a, BaseModel) and name in a.model_fields:
            out.append(a.model_fields[name].annotation)
        elif typing.get_origin(a) is dict and len(typing.get_args(a)) == 2:
            out.append(typing.get_args(a)[1])
        elif a is dict:
            out.append(Any)
        elif a is _CONFIG and name in RunConfig.model_fields:
            out.append(RunConfig.model_fields[name].annotation)
    return out


class _CONFIG:  # marker: the manifest's `config` dict is a RunConfig dump
    pass


def _root():
    from kd.evidence.manifest import Manifest

    fields = {k: f.annotation for k, f in Manifest.model_fields.items()}
    fields["config"] = _CONFIG
    return fields


def metric_problem(path: str) -> str | None:
    """None when `path` names a number manifest.json can hold; else why not."""
    parts = path.split(".")
    if not all(parts):
        return f"{path!r} is not a dotted path"
    root = _root()
    if parts[0] not in root:
        return _unknown(path)
    current = [root[parts[0]]]
    for i, part in enumerate(parts[1:], 1):
        if any(a is Any for a in current):  # an untyped map: its keys are not in the schema
            return None
        current = [c for a in current for c in _children(a, part)]
        if not current:
            return _unknown(path)
    leaves = [o for a in current for o in _options(a)]
    if any(_is_number(a) or a is Any for a in leaves):
        return None
    return f"{path!r} is not a number in manifest.json (kdflow evidence schema shows its fields)"


def numeric_paths() -> list[str]:
    """Every numeric path of the manifest schema (maps' keys as <key>; untyped maps as <key>...)."""
    from kd.config import RunConfig

    out: list[str] = []

    def walk(annotation: Any, prefix: str, depth: int) -> None:
        if depth > 8:
            return
        for a in _options(annotation):
            if _is_number(a):
                out.append(prefix)
            elif a is _CONFIG:
                walk(RunConfig, prefix, depth)
            elif isinstance(a, type) and issubclass(a, BaseModel):
                for k, f in a.model_fields.items():
                    walk(f.annotation, f"{prefix}.{k}" if prefix else k, depth + 1)
            elif typing.get_origin(a) is dict and len(typing.get_args(a)) == 2:
                walk(typing.get_args(a)[1], f"{prefix}.{ANY_KEY}", depth + 1)
            elif a is dict:
                out.append(f"{prefix}.{ANY_KEY}...")

    for name, annotation in _root().items():
        walk(annotation, name, 1)
    return sorted(set(out))


def _unknown(path: str) -> str:
    close = difflib.get_close_matches(path, numeric_paths(), n=1, cutoff=0.75)
    return f"{path!r} is not in manifest.json" + (f" (did you mean {close[0]}?)" if close else "")
