"""RunConfig: presets load, every field is described, errors name the field."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from kd.config import RunConfig, load_config
from kd.errors import ConfigError

PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.teacher.repo and cfg.student.repo


def test_reference_hyperparameters_in_qwen_presets():
    for name in ("qwen2.5-1.5b-to-0.5b.yaml", "qwen2.5-7b-to-0.5b.yaml"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / name)
        assert (cfg.kd.temperature, cfg.kd.alpha, cfg.train.lr) == (4.0, 0.3, 1.5e-5)


def _walk(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, prefix + name + ".")


def test_every_field_has_a_description():
    missing = [name for name, f in _walk(RunConfig) if not f.description]
    assert missing == []


@pytest.mark.parametrize(
    "override, field",
    [("kd.temperature=-1", "kd.temperature"), ("kd.alpha=1.5", "kd.alpha"), ("train.steps=0", "train.steps"),
     ("kd.divergence=l2", "kd.divergence"), ("train.nonsense=3", "train.nonsense"),
     ("teacher.repo=tiny:giant", "teacher.repo"), ("data.seq_len=abc", "data.seq_len")],
)
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(PRESETS[0], [override])
    assert field in str(err.value)


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["teacher.repo=tiny:teacher", "student.repo=tiny:student", "kd.alpha=0.5",
                             "train.resume_from=null", "eval.require_kl_improvement=false"])
    assert cfg.kd.alpha == 0.5 and cfg.train.resume_from is None and cfg.eval.require_kl_improvement is False


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_model_ref_kinds(tmp_path):
    cfg = load_config(None, ["teacher.repo=Qwen/Qwen2.5-7B", f"student.repo={tmp_path}"])
    assert cfg.teacher.kind == "hub" and cfg.student.kind == "local"
    assert load_config(PRESETS[0].parent / "smoke.yaml").teacher.kind == "tiny"
