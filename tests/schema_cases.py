"""The constrained fields of RunConfig, read from the JSON schema the Prefect server enforces.

`constrained_fields()` walks the distill flow's parameter schema (what the UI form and
`enforce_parameter_schema` use) and yields, for every field with a bound, pattern, length or enum,
a value that breaks it. Fields added later are covered without editing this file.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import yaml

from tests.conftest import REPO

SMOKE = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


def distill_schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.distill import distill

    return parameter_schema(distill.fn).model_dump_for_openapi()


def _resolve(node: dict, defs: dict) -> dict:
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if ref else node


def leaves(schema: dict) -> Iterator[tuple[str, dict]]:
    """(dotted path, the field's schema branches) for every non-object field under `config`."""
    defs = schema["definitions"]

    def walk(model: dict, prefix: str):
        for name, prop in model["properties"].items():
            branches = [_resolve(b, defs) for b in prop.get("anyOf", [prop])]
            sub = [b for b in branches if "properties" in b]
            if sub:
                yield from walk(sub[0], f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", branches

    yield from walk(_resolve(schema["properties"]["config"], defs), "")


def _bad_string(pattern: str) -> str | None:
    for candidate in ("", "tiny:x", "bad name!", " ", "x", "-x", "x:y:z"):
        if not re.search(pattern, candidate):
            return candidate
    return None


def violations(branches: list[dict]) -> list[tuple[str, Any]]:
    """(rule, value) pairs, each value breaking one rule of the field and allowed by no other branch."""
    out = []
    for b in branches:
        kind = b.get("type")
        num = kind in ("integer", "number")
        step = 1 if kind == "integer" else 0.5
        if num and "exclusiveMinimum" in b:
            out.append((f"> {b['exclusiveMinimum']}", b["exclusiveMinimum"]))
        if num and "minimum" in b:
            out.append((f">= {b['minimum']}", b["minimum"] - step))
        if num and "exclusiveMaximum" in b:
            out.append((f"< {b['exclusiveMaximum']}", b["exclusiveMaximum"]))
        if num and "maximum" in b:
            out.append((f"<= {b['maximum']}", b["maximum"] + step))
        if kind == "string" and b.get("minLength", 0) >= 1:
            out.append((f"minLength {b['minLength']}", ""))
        if kind == "string" and "pattern" in b:
            bad = _bad_string(b["pattern"])
            if bad is not None:
                out.append((f"pattern {b['pattern']}", bad))
        if "enum" in b or "const" in b:
            out.append(("enum", "not-an-option"))
    return out


def constrained_fields() -> list[tuple[str, str, Any]]:
    """[(dotted field, rule, bad value)] over every constrained field of RunConfig."""
    return [(path, rule, value) for path, branches in leaves(distill_schema())
            for rule, value in violations(branches)]


def with_value(path: str, value: Any, base: dict | None = None) -> dict:
    """A copy of the smoke preset with `path` set to `value`."""
    cfg = copy.deepcopy(base or SMOKE)
    node = cfg
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg
