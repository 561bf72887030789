"""Every rule RunConfig enforces is in its JSON schema, floats are finite, descriptions read as Markdown.

The Prefect UI builds the run form from the schema and the server checks parameters against it
(`enforce_parameter_schema`): a rule that lives only in a Python validator lets the form and the API
accept a run that fails later on a worker. The server-side check (HTTP 409, no flow run) is in
tests/test_prefect_server.py; here the schema and the model are compared value by value.
"""

from __future__ import annotations

import html
import math
import re

import pytest
from pydantic import ValidationError

from kd.config import RunConfig, load_config
from kd.errors import ConfigError
from tests.conftest import REPO
from tests.schema_cases import SMOKE, constrained_fields, distill_schema, leaves, with_value

# Rules between two fields (train.warmup_steps <= train.steps, init only with repo `from-teacher`, ...)
# cannot be a JSON schema bound of either: they are model-level validators, whose errors sit at the
# enclosing model, not at the field. Those are the only refusals the schema may leave to the model.
PROBES = (-(10**9), -1, -0.5, 0, 0.5, 1, 1.5, 2, 64, 65, 10**9, "", " ", "x", "tiny:x", "tiny:teacher", "bad name!",
          "host:29500", None, True)


def _schema_ok(cfg: dict) -> bool:
    from prefect.utilities.schema_tools.validation import is_valid

    return is_valid({"config": cfg}, SCHEMA)


def _model_ok(cfg: dict) -> bool:
    try:
        RunConfig.model_validate(cfg)
        return True
    except ValidationError:
        return False


def _only_cross_field(cfg: dict, path: str) -> bool:
    """Refused only by model-level rules between fields: each error sits at a model enclosing `path`."""
    try:
        RunConfig.model_validate(cfg)
    except ValidationError as err:
        field = tuple(path.split("."))
        return all(e["type"] == "value_error" and tuple(map(str, e["loc"])) == field[: len(e["loc"])]
                   and len(e["loc"]) < len(field) for e in err.errors())
    return False


SCHEMA = distill_schema()
LEAVES = dict(leaves(SCHEMA))


def test_schema_has_the_bounds():
    """Spot checks of how bounds read in the schema (the form shows them, the server enforces them)."""
    defs = SCHEMA["definitions"]
    assert defs["KDConfig"]["properties"]["temperature"]["exclusiveMinimum"] == 0
    assert defs["KDConfig"]["properties"]["alpha"]["maximum"] == 1
    assert "pattern" in defs["ModelRef"]["properties"]["repo"]
    assert len(constrained_fields()) >= 40


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_model_and_schema_agree_on_every_value(path):
    """For each field, no probe value passes the schema (so the form and the server take it) and is then
    refused by the model (so the run fails on a worker). The model may be laxer (YAML `true` as 1)."""
    late = [repr(v) for v in PROBES if _schema_ok(cfg := with_value(path, v)) and not _model_ok(cfg)
            and not _only_cross_field(cfg, path)]
    assert late == [], f"{path}: the schema accepts, the model refuses: {', '.join(late)}"


def test_the_smoke_preset_is_valid_in_both():
    assert _model_ok(SMOKE) and _schema_ok(SMOKE)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_field_is_finite(bad):
    floats = [p for p, branches in LEAVES.items() if any(b.get("type") == "number" for b in branches)]
    assert "kd.temperature" in floats and "train.lr" in floats
    accepted = [p for p in floats if _model_ok(with_value(p, bad))]
    assert accepted == []
    with pytest.raises(ConfigError, match=r"kd\.temperature: must be a finite number"):
        load_config(REPO / "configs" / "smoke.yaml", ["kd.temperature=.inf"])


def test_bound_errors_name_field_and_bound():
    with pytest.raises(ConfigError, match=r"kd\.temperature: must be > 0, got -1"):
        load_config(REPO / "configs" / "smoke.yaml", ["kd.temperature=-1"])


def _descriptions() -> list[tuple[str, str]]:
    out = []
    for model, d in SCHEMA["definitions"].items():
        if d.get("description"):
            out.append((model, d["description"]))
        for name, prop in d.get("properties", {}).items():
            if prop.get("description"):
                out.append((f"{model}.{name}", prop["description"]))
    return out


def test_descriptions_read_the_same_once_rendered_as_markdown():
    """The UI renders descriptions as Markdown: `<run>` vanished as an HTML tag and `a*b*c` turned
    italic. Rendered and stripped of tags, each description must still say what its source says."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")
    broken = []
    for where, text in _descriptions():
        rendered = md.render(text)
        shown = html.unescape(re.sub(r"<[^>]+>", "", rendered))
        if " ".join(shown.split()) != " ".join(text.replace("`", "").split()):
            broken.append(f"{where}: {text!r} renders as {shown.strip()!r}")
    assert broken == []
