"""Bad inputs (issue 9): each one is refused with exit code 2 and ONE line naming the file, field,
tensor or line at fault, and no manifest anywhere claims `pass`.

Every case is tested at the cheapest level that catches it:
- unit: the preflight inspectors (kd.inspect_weights / inspect_model / inspect_data), kd.vocab and
  kd.config called directly; the exit code is the one flows.cli gives the raised error;
- cli: `kdflow run ... --dry-run` in-process through flows.cli.main (exit code + stderr);
- subprocess: the installed `kdflow` console script, a fresh process per case;
- flow: one input error found inside the flow (the vocab check), through the real Prefect flow:
  exit 2, one line, no Prefect traceback, and the fail manifest written.
Models are corrupt copies of the deterministic tiny pair; data files are written per test.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import exit_code, main
from kd.config import DataConfig, load_config
from kd.errors import InputError
from kd.inspect_data import check_data_files, check_enough_tokens, data_files
from kd.inspect_model import check_tokenizer, read_model_config
from kd.inspect_weights import inspect_weights, read_safetensors_header
from kd.preflight import check_run_name, inspect_model_folder
from kd.vocab import align_vocab

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"


def _ids(cases: list[tuple]) -> list[str]:
    return [c[0] for c in cases]


# --------------------------------------------------------------------------- shared fixtures and checks
@pytest.fixture(scope="module")
def good(tiny_pair, tmp_path_factory) -> tuple[Path, Path]:
    """A private copy of the tiny (teacher, student) pair as plain local folders (never modified)."""
    root = tmp_path_factory.mktemp("good")
    teacher, student = tiny_pair
    return shutil.copytree(teacher, root / "teacher"), shutil.copytree(student, root / "student")


def copy_model(src: Path, tmp_path: Path, name: str | None = None) -> Path:
    return shutil.copytree(src, tmp_path / (name or src.name))


def assert_no_pass_manifest(root: Path) -> None:
    for m in Path(root).rglob("manifest.json"):
        assert json.loads(m.read_text()).get("run", {}).get("status") != "pass", m


def assert_refused(code: int, message: str, names: tuple[str, ...], root: Path) -> None:
    """Exit 2, one line, every expected name in it, no Python traceback, no passing manifest."""
    assert code == 2, message
    text = message.strip()
    assert text and "\n" not in text, f"not one line: {message!r}"
    assert "Traceback" not in text
    for n in names:
        assert str(n) in text, f"{n!r} not named in: {text}"
    assert_no_pass_manifest(root)


def refused(fn, *names, root: Path) -> str:
    """Call a check directly; it must raise an InputError (exit 2 in the CLI) naming `names`."""
    with pytest.raises(InputError) as info:
        fn()
    assert_refused(exit_code(info.value), str(info.value), names, root)
    return str(info.value)


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def dry_run_args(tmp_path: Path, teacher: Path, student: Path, *sets: str, config: Path = SMOKE) -> list[str]:
    args = ["run", str(config), "--dry-run", "--set", f"teacher.repo={teacher}", "--set", f"student.repo={student}",
            "--set", f"work_dir={tmp_path}/runs", "--set", f"evidence_dir={tmp_path}/evidence"]
    for s in sets:
        args += ["--set", s]
    return args


# --------------------------------------------------------------------------- safetensors headers (unit)
def st_read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(path: Path, header, data: bytes, *, raw_header: bytes | None = None) -> None:
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit(fn):
    """A mutation of the header dict (and data) of model.safetensors."""
    def apply(path: Path) -> None:
        header, data = st_read(path)
        out = fn(header, data)
        st_write(path, header, out if isinstance(out, bytes) else data)
    return apply


def _set(field, value, which=0):
    def fn(h, d):
        h[by_offset(h)[which]][field] = value
    return _edit(fn)


def _cut(n):
    return lambda p: p.write_bytes(p.read_bytes()[:-n])


def _shift_last(delta):
    def fn(h, d):
        last = by_offset(h)[-1]
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + delta, e + delta]
        return d[:b] + b"\0" * delta + d[b:] if delta > 0 else d
    return _edit(fn)


def _shape_double(h, d):
    name = by_offset(h)[0]
    h[name]["shape"] = [h[name]["shape"][0] * 2, *h[name]["shape"][1:]]


def _first_name(h):
    return by_offset(h)[0]


SAFETENSORS_CASES = [
    ("st-truncated-data", _cut(100), ("model.safetensors", "truncated")),
    ("st-truncated-in-header", lambda p: p.write_bytes(p.read_bytes()[:40]), ("model.safetensors", "truncated")),
    ("st-empty-file", lambda p: p.write_bytes(b""), ("model.safetensors", "too short")),
    ("st-five-bytes", lambda p: p.write_bytes(b"\x01\x02\x03\x04\x05"), ("model.safetensors", "too short")),
    ("st-header-length-zero", lambda p: p.write_bytes(struct.pack("<Q", 0) + b"{}"), ("model.safetensors", "header length 0")),
    ("st-header-length-huge", lambda p: p.write_bytes(struct.pack("<Q", 2**40) + b"{}"), ("model.safetensors", "not plausible")),
    ("st-header-not-json", lambda p: st_write(p, None, b"", raw_header=b'{"a": [1, 2'), ("model.safetensors", "not valid JSON")),
    ("st-header-not-utf8", lambda p: st_write(p, None, b"", raw_header=b'{"\xff\xfe": 1}'), ("model.safetensors", "not UTF-8")),
    ("st-header-a-list", lambda p: st_write(p, [1, 2], b""), ("model.safetensors", "must be a JSON object")),
    ("st-unknown-dtype", _set("dtype", "F13"), ("model.safetensors", "unknown dtype 'F13'", "model.embed_tokens.weight")),
    ("st-missing-dtype", _edit(lambda h, d: h[_first_name(h)].pop("dtype")), ("model.safetensors", "unknown dtype None")),
    ("st-wrong-dtype", _set("dtype", "F16"), ("model.safetensors", "dtype F16", "model.embed_tokens.weight", "wrong dtype or shape")),
    ("st-wrong-shape", _edit(_shape_double), ("model.safetensors", "model.embed_tokens.weight", "wrong dtype or shape")),
    ("st-negative-shape", _set("shape", [-1, 64]), ("model.safetensors", "shape must be")),
    ("st-shape-a-string", _set("shape", "384x64"), ("model.safetensors", "shape must be")),
    ("st-offsets-missing", _edit(lambda h, d: h[_first_name(h)].pop("data_offsets")), ("model.safetensors", "data_offsets")),
    ("st-offsets-reversed", _set("data_offsets", [100, 0]), ("model.safetensors", "data_offsets must be")),
    ("st-offsets-floats", _set("data_offsets", [0.0, 98304.0]), ("model.safetensors", "data_offsets must be")),
    ("st-overlapping-tensors", _shift_last(-4), ("model.safetensors", "overlaps")),
    ("st-gap-between-tensors", _shift_last(8), ("model.safetensors", "gap of 8 bytes")),
    ("st-trailing-bytes", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), ("model.safetensors", "16 bytes after the last tensor")),
    ("st-metadata-a-list", _edit(lambda h, d: h.__setitem__("__metadata__", ["pt"])), ("model.safetensors", "__metadata__")),
    ("st-metadata-non-string", _edit(lambda h, d: h.__setitem__("__metadata__", {"format": 1})), ("model.safetensors", "__metadata__")),
    ("st-entry-a-number", _edit(lambda h, d: h.__setitem__(_first_name(h), 7)), ("model.safetensors", "model.embed_tokens.weight", "must be an object")),
]


@pytest.mark.parametrize("case,corrupt,names", SAFETENSORS_CASES, ids=_ids(SAFETENSORS_CASES))
def test_safetensors_header(case, corrupt, names, good, tmp_path):
    student = copy_model(good[1], tmp_path)
    corrupt(student / "model.safetensors")
    refused(lambda: read_safetensors_header(student / "model.safetensors"), *names, root=tmp_path)
    # the folder-level check (what preflight runs) refuses it the same way
    refused(lambda: inspect_weights(student), *names, root=tmp_path)


# --------------------------------------------------------------------------- weight files and index.json (unit)
INDEX = "model.safetensors.index.json"


def _index(wmap_edit=None, raw: str | None = None):
    def make(d: Path) -> None:
        header, _ = st_read(d / "model.safetensors")
        wmap = {k: "model.safetensors" for k in header if k != "__metadata__"}
        if wmap_edit:
            wmap_edit(wmap)
        (d / INDEX).write_text(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": wmap}))
    return make


def _only_pickle(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


WEIGHT_FOLDER_CASES = [
    ("weights-none", lambda d: (d / "model.safetensors").unlink(), ("no weight files",)),
    ("weights-only-other-safetensors", lambda d: (d / "model.safetensors").rename(d / "consolidated.safetensors"),
     ("no model.safetensors", "consolidated.safetensors")),
    ("weights-pickle-only", _only_pickle, ("pytorch_model.bin", "pickle")),
    ("index-not-json", _index(raw='{"weight_map": {'), (INDEX, "not valid JSON")),
    ("index-no-weight-map", _index(raw='{"metadata": {}}'), (INDEX, "weight_map")),
    ("index-weight-map-a-list", _index(raw='{"weight_map": ["model.safetensors"]}'), (INDEX, "weight_map")),
    ("index-missing-shard", _index(lambda m: m.__setitem__("model.norm.weight", "model-00002-of-00002.safetensors")),
     (INDEX, "model-00002-of-00002.safetensors")),
    ("index-tensor-not-in-shard", _index(lambda m: m.__setitem__("model.ghost.weight", "model.safetensors")),
     (INDEX, "model.ghost.weight")),
    ("index-unlisted-tensor", _index(lambda m: m.pop("model.norm.weight")), (INDEX, "model.norm.weight")),
    ("weights-duplicate-tensor", lambda d: (shutil.copy(d / "model.safetensors", d / "model-copy.safetensors"),
                                            _index(lambda m: m.__setitem__("model.norm.weight", "model-copy.safetensors"))(d)),
     ("in both", "model-copy.safetensors")),
]


@pytest.mark.parametrize("case,corrupt,names", WEIGHT_FOLDER_CASES, ids=_ids(WEIGHT_FOLDER_CASES))
def test_weight_files(case, corrupt, names, good, tmp_path):
    student = copy_model(good[1], tmp_path)
    corrupt(student)
    refused(lambda: inspect_weights(student), *names, root=tmp_path)


# --------------------------------------------------------------------------- config.json (unit)
def _cfg_edit(fn):
    def apply(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return apply


def _cfg_raw(data: bytes):
    return lambda d: (d / "config.json").write_bytes(data)


CONFIG_CASES = [
    ("config-truncated", lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:120]),
     ("config.json", "not valid JSON")),
    ("config-not-json", _cfg_raw(b"hidden_size: 64\n"), ("config.json", "not valid JSON")),
    ("config-a-list", _cfg_raw(b'[{"hidden_size": 64}]'), ("config.json", "must be a JSON object, got list")),
    ("config-a-string", _cfg_raw(b'"qwen2"'), ("config.json", "must be a JSON object, got str")),
    ("config-empty", _cfg_raw(b""), ("config.json", "is empty")),
    ("config-not-utf8", _cfg_raw(b'{"model_type": "qwen2\xe9"}'), ("config.json", "not UTF-8")),
    ("config-missing", lambda d: (d / "config.json").unlink(), ("config.json", "missing")),
    ("config-no-hidden-size", _cfg_edit(lambda c: c.pop("hidden_size")), ("config.json", '"hidden_size"')),
    ("config-no-layers", _cfg_edit(lambda c: c.pop("num_hidden_layers")), ("config.json", '"num_hidden_layers"')),
    ("config-heads-zero", _cfg_edit(lambda c: c.update(num_attention_heads=0)), ("config.json", '"num_attention_heads"')),
    ("config-no-vocab-size", _cfg_edit(lambda c: c.pop("vocab_size")), ("config.json", '"vocab_size"')),
    ("config-hidden-size-string", _cfg_edit(lambda c: c.update(hidden_size="64")), ("config.json", '"hidden_size"', "positive integer")),
    ("config-hidden-size-zero", _cfg_edit(lambda c: c.update(hidden_size=0)), ("config.json", '"hidden_size"', "got 0")),
    ("config-hidden-size-negative", _cfg_edit(lambda c: c.update(hidden_size=-64)), ("config.json", "got -64")),
    ("config-hidden-size-float", _cfg_edit(lambda c: c.update(hidden_size=64.0)), ("config.json", '"hidden_size"', "got 64.0")),
    ("config-hidden-size-bool", _cfg_edit(lambda c: c.update(num_hidden_layers=True)), ("config.json", '"num_hidden_layers"')),
    ("config-vocab-size-null", _cfg_edit(lambda c: c.update(vocab_size=None)), ("config.json", '"vocab_size"')),
    ("config-no-model-type", _cfg_edit(lambda c: c.pop("model_type")), ("config.json", "model_type")),
    ("config-model-type-empty", _cfg_edit(lambda c: c.update(model_type="")), ("config.json", "model_type")),
]


@pytest.mark.parametrize("case,corrupt,names", CONFIG_CASES, ids=_ids(CONFIG_CASES))
def test_model_config(case, corrupt, names, good, tmp_path):
    student = copy_model(good[1], tmp_path)
    corrupt(student)
    refused(lambda: read_model_config(student), *names, root=tmp_path)


def test_a_causal_lm_without_attention_heads_is_not_refused(tmp_path):
    """Mamba has no attention heads: config.json is read, and the plan still sizes it."""
    from kd.preflight import estimate_params

    (tmp_path / "config.json").write_text(J({"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24,
                                             "vocab_size": 50280, "tie_word_embeddings": True}))
    assert estimate_params(read_model_config(tmp_path)) > 0


def test_model_folder_that_does_not_exist(tmp_path):
    refused(lambda: inspect_model_folder(tmp_path / "nope", "student"), "student folder", str(tmp_path / "nope"),
            root=tmp_path)


# --------------------------------------------------------------------------- architecture vs weights (unit, meta device)
def _swap_model_type(model_type: str, arch: str):
    return _cfg_edit(lambda c: c.update(model_type=model_type, architectures=[arch]))


def _drop_tensor(name: str):
    def fn(h, d):
        b, e = h.pop(name)["data_offsets"]
        for k in h:
            if k != "__metadata__" and h[k]["data_offsets"][0] >= e:
                h[k]["data_offsets"] = [h[k]["data_offsets"][0] - (e - b), h[k]["data_offsets"][1] - (e - b)]
        return d[:b] + d[e:]
    return lambda d: _edit(fn)(d / "model.safetensors")


def _add_tensor(name: str):
    def fn(h, d):
        h[name] = {"dtype": "F32", "shape": [4], "data_offsets": [len(d), len(d) + 16]}
        return d + b"\0" * 16
    return lambda d: _edit(fn)(d / "model.safetensors")


ARCH_CASES = [
    ("arch-unknown-model-type", _swap_model_type("fancy-llm", "FancyForCausalLM"), ("config.json", "'fancy-llm'", "not an architecture")),
    ("arch-not-a-causal-lm", _swap_model_type("vit", "ViTModel"), ("config.json", "'vit'", "no causal-LM")),
    ("arch-llama-over-qwen2-weights", _swap_model_type("llama", "LlamaForCausalLM"),
     ("LlamaForCausalLM", "unexpected", "self_attn.q_proj.bias")),
    ("arch-bert-over-qwen2-weights", _swap_model_type("bert", "BertLMHeadModel"), ("BertLMHeadModel", "missing", "unexpected")),
    ("arch-missing-tensor", _drop_tensor("model.layers.1.mlp.down_proj.weight"),
     ("1 missing", "model.layers.1.mlp.down_proj.weight")),
    ("arch-unexpected-tensor", _add_tensor("model.extra_adapter.weight"), ("1 unexpected", "model.extra_adapter.weight")),
    ("arch-more-layers-in-config", _cfg_edit(lambda c: (c.update(num_hidden_layers=3), c.pop("layer_types"))),
     ("missing", "model.layers.2.")),
    ("arch-fewer-layers-in-config", _cfg_edit(lambda c: (c.update(num_hidden_layers=1), c.pop("layer_types"))),
     ("unexpected", "model.layers.1.")),
    ("arch-hidden-size-changed", _cfg_edit(lambda c: c.update(hidden_size=96)), ("shape mismatch", "model.embed_tokens.weight")),
    ("arch-vocab-size-larger", _cfg_edit(lambda c: c.update(vocab_size=512)), ("shape mismatch", "[384, 64]", "[512, 64]")),
    ("arch-untied-head-missing", _cfg_edit(lambda c: c.update(tie_word_embeddings=False)), ("missing", "lm_head.weight")),
    ("arch-intermediate-size-changed", _cfg_edit(lambda c: c.update(intermediate_size=256)), ("shape mismatch", "mlp.")),
    # no heads in config.json: transformers silently uses Qwen2's default (32), which the weights contradict
    ("arch-heads-missing-in-config", _cfg_edit(lambda c: c.pop("num_attention_heads")), ("shape mismatch", "k_proj")),
    ("arch-heads-do-not-divide", _cfg_edit(lambda c: c.update(num_attention_heads=3, num_key_value_heads=3)),
     ("q_proj",)),
]


@pytest.mark.parametrize("case,corrupt,names", ARCH_CASES, ids=_ids(ARCH_CASES))
def test_architecture_against_weight_headers(case, corrupt, names, good, tmp_path):
    student = copy_model(good[1], tmp_path)
    corrupt(student)
    refused(lambda: inspect_model_folder(student, "student"), str(student), *names, root=tmp_path)


def test_the_good_models_pass_every_check(good):
    for d, role in ((good[0], "teacher"), (good[1], "student")):
        assert "Qwen2ForCausalLM" in inspect_model_folder(d, role)


def test_safetensors_files_transformers_does_not_load_are_not_inspected(good, tmp_path):
    """Mistral repos ship consolidated.safetensors beside model.safetensors; only the latter is loaded."""
    student = copy_model(good[1], tmp_path)
    (student / "consolidated.safetensors").write_bytes(b"not the weights transformers loads")
    assert "Qwen2ForCausalLM" in inspect_model_folder(student, "student")


def test_a_checkpoint_transformers_renames_on_load_is_not_refused(good, tmp_path):
    """transformers 5 fuses Mixtral's per-expert weights when loading: the names in a valid file differ
    from the module's by design, so preflight must not call them missing/unexpected (the load checks)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=384, num_local_experts=2, max_position_embeddings=64)
    d = tmp_path / "mixtral"
    MixtralForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(good[1] / f, d / f)
    assert "names not compared" in inspect_model_folder(d, "student")


# --------------------------------------------------------------------------- tokenizers (unit; kd.vocab)
def _tok_raw(data: bytes, name: str = "tokenizer.json"):
    return lambda d: (d / name).write_bytes(data)


TOKENIZER_CASES = [
    ("tok-truncated", lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:3000]),
     ("tokenizer.json", "not valid JSON (truncated?)")),
    ("tok-empty", _tok_raw(b""), ("tokenizer.json", "is empty")),
    ("tok-not-utf8", _tok_raw(b'{"model": "\xff"}'), ("tokenizer.json", "not UTF-8")),
    ("tok-not-a-tokenizer", _tok_raw(b'{"vocab": {"a": 0}}'), ("tokenizer.json", "not a tokenizer")),
    ("tok-a-list", _tok_raw(b'["a", "b"]'), ("tokenizer.json", "must be a JSON object")),
    ("tok-student-missing", lambda d: (d / "tokenizer.json").unlink(), ("student tokenizer missing", "tokenizer.json")),
    ("tok-config-not-json", _tok_raw(b'{"eos_token": ', "tokenizer_config.json"), ("tokenizer_config.json", "not valid JSON")),
    ("tok-larger-than-vocab-rows", _cfg_edit(lambda c: c.update(vocab_size=100)), ("tokenizer.json", "vocab_size is 100")),
]


@pytest.mark.parametrize("case,corrupt,names", TOKENIZER_CASES, ids=_ids(TOKENIZER_CASES))
def test_tokenizer_files(case, corrupt, names, good, tmp_path):
    student = copy_model(good[1], tmp_path)
    corrupt(student)
    raw = json.loads((student / "config.json").read_text())
    refused(lambda: check_tokenizer(student, "student", raw), *names, root=tmp_path)


def test_missing_teacher_tokenizer_is_named_not_a_vocab_verdict(good, tmp_path):
    """It used to read as an empty vocabulary and be reported as 'student-larger'."""
    teacher = copy_model(good[0], tmp_path)
    (teacher / "tokenizer.json").unlink()
    want = f"teacher tokenizer missing: {teacher / 'tokenizer.json'}"
    assert refused(lambda: check_tokenizer(teacher, "teacher"), want, root=tmp_path)
    msg = refused(lambda: align_vocab(teacher, good[1]), want, root=tmp_path)
    assert "student-larger" not in msg


VOCAB_CASES = [
    ("vocab-truncated-teacher-tokenizer", "teacher",
     lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes()[:500]), ("tokenizer.json", "teacher")),
    ("vocab-student-tokenizer-missing", "student", lambda d: (d / "tokenizer.json").unlink(), ("student tokenizer missing",)),
    ("vocab-teacher-config-not-utf8", "teacher", _cfg_raw(b'{"vocab_size": 4\xff}'), ("config.json",)),
    ("vocab-tokens-differ", "teacher", lambda d: _swap_two_tokens(d / "tokenizer.json"), ("tokenizers differ",)),
]


def _swap_two_tokens(path: Path) -> None:
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


@pytest.mark.parametrize("case,role,corrupt,names", VOCAB_CASES, ids=_ids(VOCAB_CASES))
def test_vocab_check_names_the_file(case, role, corrupt, names, good, tmp_path):
    teacher, student = good
    broken = copy_model(teacher if role == "teacher" else student, tmp_path)
    corrupt(broken)
    pair = (broken, student) if role == "teacher" else (teacher, broken)
    msg = refused(lambda: align_vocab(*pair), *names, root=tmp_path)
    assert "student-larger" not in msg


# --------------------------------------------------------------------------- data files (unit)
def _write(name: str, data: bytes | str):
    def make(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p
    return make


def _parquet(name: str, table: dict):
    def make(tmp: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp / name
        pq.write_table(pa.table(table), p)
        return p
    return make


def _cut_parquet(tmp: Path) -> Path:
    p = _parquet("cut.parquet", {"text": ["hello world"] * 50})(tmp)
    p.write_bytes(p.read_bytes()[:-20])
    return p


def _empty_folder(tmp: Path) -> Path:
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "notes.csv").write_text("a,b\n")
    return tmp / "corpus"


J = json.dumps
DATA_CASES = [
    ("data-txt-not-utf8", _write("latin1.txt", "caf\xe9 au lait\n".encode("latin-1")), ("latin1.txt:1", "not UTF-8")),
    ("data-txt-not-utf8-line-3", _write("mixed.txt", b"one\ntwo\nthree \xff\xfe\n"), ("mixed.txt:3", "not UTF-8")),
    ("data-jsonl-not-utf8", _write("x.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), ("x.jsonl:2", "not UTF-8")),
    ("data-jsonl-bad-json", _write("x.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n'), ("x.jsonl:3", "not valid JSON")),
    ("data-jsonl-record-a-list", _write("x.jsonl", '["text", "a"]\n'), ("x.jsonl:1", "not an object")),
    ("data-jsonl-record-a-string", _write("x.jsonl", '{"text": "fine"}\n"just text"\n'), ("x.jsonl:2", "not an object")),
    ("data-jsonl-no-text-field", _write("x.jsonl", J({"text": "a"}) + "\n" + J({"body": "b"}) + "\n"), ("x.jsonl:2", "no field 'text'")),
    ("data-jsonl-text-null", _write("x.jsonl", J({"text": "a"}) + "\n" + J({"text": None}) + "\n"), ("x.jsonl:2", "text is null")),
    ("data-jsonl-text-int", _write("x.jsonl", J({"text": 42}) + "\n"), ("x.jsonl:1", "text is int")),
    ("data-jsonl-text-float", _write("x.jsonl", J({"text": 1.5}) + "\n"), ("x.jsonl:1", "text is float")),
    ("data-jsonl-text-bool", _write("x.jsonl", J({"text": True}) + "\n"), ("x.jsonl:1", "text is bool")),
    ("data-jsonl-text-list", _write("x.jsonl", J({"text": ["a", "b"]}) + "\n"), ("x.jsonl:1", "text is list")),
    ("data-jsonl-text-object", _write("x.jsonl", J({"text": {"en": "a"}}) + "\n"), ("x.jsonl:1", "text is dict")),
    ("data-jsonl-text-empty", _write("x.jsonl", J({"text": "a"}) + "\n\n" + J({"text": ""}) + "\n"), ("x.jsonl:3", "text is empty")),
    ("data-jsonl-text-whitespace", _write("x.jsonl", J({"text": "  \t "}) + "\n"), ("x.jsonl:1", "text is empty")),
    ("data-jsonl-only-blank-lines", _write("x.jsonl", "\n\n  \n"), ("x.jsonl", "no documents")),
    ("data-parquet-corrupt", _write("x.parquet", b"PAR1 this is not parquet at all"), ("x.parquet", "not a readable parquet")),
    ("data-parquet-truncated", _cut_parquet, ("cut.parquet", "not a readable parquet")),
    ("data-parquet-empty-file", _write("x.parquet", b""), ("x.parquet", "not a readable parquet")),
    ("data-parquet-no-text-column", _parquet("x.parquet", {"body": ["a", "b"]}), ("x.parquet", "no column 'text'")),
    ("data-parquet-int-column", _parquet("x.parquet", {"text": [1, 2]}), ("x.parquet", "column 'text' is int64")),
    ("data-parquet-null-text", _parquet("x.parquet", {"text": ["a", None]}), ("x.parquet", "row 1", "text is null")),
    ("data-parquet-empty-text", _parquet("x.parquet", {"text": ["", "b"]}), ("x.parquet", "row 0", "text is empty")),
    ("data-txt-empty", _write("x.txt", ""), ("x.txt", "no documents")),
    ("data-txt-only-blank-lines", _write("x.txt", "\n \n\t\n"), ("x.txt", "no documents")),
    ("data-folder-without-data-files", _empty_folder, ("corpus", "no .txt/.jsonl/.parquet/.arrow files")),
    ("data-source-missing", lambda tmp: tmp / "nowhere.txt", ("nowhere.txt", "no such file or folder")),
    ("data-unsupported-suffix", _write("x.csv", "text\nhello\n"), ("x.csv", "unsupported file type '.csv'")),
]


@pytest.mark.parametrize("case,make,names", DATA_CASES, ids=_ids(DATA_CASES))
def test_data_files(case, make, names, tmp_path):
    source = make(tmp_path)
    cfg = DataConfig(source=str(source))
    refused(lambda: check_data_files(cfg, data_files(cfg)), *names, root=tmp_path)


def test_bad_records_skip_lets_the_data_step_count_them(tmp_path):
    p = _write("x.jsonl", J({"text": "a b"}) + "\n" + J({"text": None}) + "\n" + J({"text": "c"}) + "\n")(tmp_path)
    assert check_data_files(DataConfig(source=str(p), bad_records="skip"), [p]) == ["a b", "c"]
    with pytest.raises(InputError, match="data.bad_records=skip"):
        check_data_files(DataConfig(source=str(p)), [p])


def test_preflight_reads_only_the_head_of_a_big_corpus(monkeypatch, good, tmp_path):
    """Preflight decodes the first CHECK_BYTES of each file: a big corpus costs it no more than a small
    one, and what it did not read is never called too small (the data step reads everything)."""
    import kd.inspect_data

    monkeypatch.setattr(kd.inspect_data, "CHECK_BYTES", 600)
    p = _write("big.txt", b"hello world\n" * 100 + b"caf\xe9\n")(tmp_path)  # a Latin-1 line past the budget
    cfg = load_config(SMOKE, [f"data.source={p}"])
    docs = check_data_files(cfg.data, data_files(cfg.data))
    assert not docs.complete and 0 < len(docs) < 100
    assert check_enough_tokens(cfg, docs, good[1] / "tokenizer.json") > 0  # not refused: the rest is unread


def test_custom_text_field_is_named(tmp_path):
    p = _write("x.jsonl", J({"text": "a"}) + "\n")(tmp_path)
    cfg = DataConfig(source=str(p), text_field="body")
    refused(lambda: check_data_files(cfg, data_files(cfg)), "x.jsonl:1", "no field 'body'", root=tmp_path)


# (id, corpus, overrides, expected names). The number named is what training really needs: train.batch_size
# blocks of data.seq_len from the training documents (8 x 64 = 512) with data.heldout_fraction of the documents
# held out: 512 / 0.9 = 569 (the vocab check's sample used to say 128).
TOKEN_CASES = [
    ("tokens-nine-token-corpus", "hello world\n", [],
     ("9 tokens", "training needs about 569", "train.batch_size=8", "data.seq_len=64", "data.heldout_fraction=0.1")),
    ("tokens-seq-len-128", "hello world\n" * 40, ["data.seq_len=128"], ("needs about 1138",)),
    ("tokens-half-held-out", "hello world\n" * 5, ["train.batch_size=2", "data.heldout_fraction=0.5"],
     ("needs about 256",)),
    ("tokens-max-tokens-too-small", "hello world\n" * 400, ["data.max_tokens=100"], ("data.max_tokens=100", "569")),
    ("tokens-one-document", "hello world " * 1000 + "\n", [], ("1 document", "need at least 2")),
]


@pytest.mark.parametrize("case,corpus,overrides,names", TOKEN_CASES, ids=_ids(TOKEN_CASES))
def test_too_little_data_names_the_real_need(case, corpus, overrides, names, good, tmp_path):
    (tmp_path / "c.txt").write_text(corpus)
    cfg = load_config(SMOKE, [f"data.source={tmp_path / 'c.txt'}", *overrides])
    docs = check_data_files(cfg.data, data_files(cfg.data))
    refused(lambda: check_enough_tokens(cfg, docs, good[1] / "tokenizer.json"), *names, root=tmp_path)


# --------------------------------------------------------------------------- config files and fields (unit)
def _yaml(tmp: Path, text: bytes) -> Path:
    p = tmp / "run.yaml"
    p.write_bytes(text)
    return p


CONFIG_FILE_CASES = [
    ("yaml-not-utf8", b"teacher:\n  repo: tiny:teacher\nstudent:\n  repo: caf\xe9\n", [], ("run.yaml", "not UTF-8", "line 4")),
    ("yaml-utf16", "teacher: {repo: tiny:teacher}\n".encode("utf-16"), [], ("run.yaml", "not UTF-8")),
    ("yaml-not-a-mapping", b"- teacher\n- student\n", [], ("run.yaml", "must hold a mapping, got list")),
    ("yaml-syntax", b"teacher: {repo: tiny:teacher\nstudent: [\n", [], ("run.yaml", "not valid YAML")),
    ("field-unknown", b"", ["train.stpes=3"], ("train.stpes: unknown field",)),
    ("field-temperature-inf", b"", ["kd.temperature=.inf"], ("kd.temperature",)),
    ("field-lr-inf", b"", ["train.lr=.inf"], ("train.lr",)),
    ("field-alpha-nan", b"", ["kd.alpha=.nan"], ("kd.alpha",)),
    ("field-steps-zero", b"", ["train.steps=0"], ("train.steps",)),
    ("field-seq-len-one", b"", ["data.seq_len=1"], ("data.seq_len",)),
    ("field-name-with-slash", b"", ["name=a/b"], ("name",)),
    ("field-warmup-beyond-steps", b"", ["train.warmup_steps=500"], ("train.warmup_steps",)),
    ("override-without-equals", b"", ["kd.alpha"], ("kd.alpha", "expected section.field=value")),
    ("field-tiny-unknown", b"", ["student.repo=tiny:giant"], ("student.repo", "tiny:giant")),
]


@pytest.mark.parametrize("case,text,overrides,names", CONFIG_FILE_CASES, ids=_ids(CONFIG_FILE_CASES))
def test_config_files_and_fields(case, text, overrides, names, tmp_path):
    path = _yaml(tmp_path, text) if text else SMOKE
    refused(lambda: load_config(path, overrides), *names, root=tmp_path)


def test_config_file_missing(tmp_path):
    refused(lambda: load_config(tmp_path / "nope.yaml"), "config file not found", "nope.yaml", root=tmp_path)


NAME_CASES = [
    ("name-too-long", ["name=" + "r" * 250], ("name:", "250 bytes", "NAME_MAX")),
    ("name-default-too-long", None, ("name (default, from the model names)", "NAME_MAX")),
]


@pytest.mark.parametrize("case,overrides,names", NAME_CASES, ids=_ids(NAME_CASES))
def test_run_name_must_fit_the_file_system(case, overrides, names, tmp_path):
    if overrides is None:  # model folders with long names make a long default run name
        long = "m" * 130
        overrides = [f"teacher.repo={tmp_path / ('t' + long)}", f"student.repo={tmp_path / ('s' + long)}"]
    cfg = load_config(SMOKE, [f"evidence_dir={tmp_path}/ev", *overrides])
    refused(lambda: check_run_name(cfg), *names, root=tmp_path)


# --------------------------------------------------------------------------- through the CLI, in-process (--dry-run)
def _student_broken(fn):
    def make(tmp: Path, good) -> list[str]:
        s = copy_model(good[1], tmp)
        fn(s)
        return dry_run_args(tmp, good[0], s)
    return make


def _teacher_broken(fn):
    def make(tmp: Path, good) -> list[str]:
        t = copy_model(good[0], tmp)
        fn(t)
        return dry_run_args(tmp, t, good[1])
    return make


def _data(name: str, data: bytes | str, *sets: str):
    def make(tmp: Path, good) -> list[str]:
        p = _write(name, data)(tmp)
        return dry_run_args(tmp, good[0], good[1], f"data.source={p}", *sets)
    return make


CLI_CASES = [
    ("cli-truncated-safetensors", _student_broken(lambda d: _cut(100)(d / "model.safetensors")),
     ("student-model", "model.safetensors", "truncated")),
    ("cli-wrong-dtype-header", _teacher_broken(lambda d: _set("dtype", "BF16")(d / "model.safetensors")),
     ("teacher-model", "model.safetensors", "dtype BF16")),
    ("cli-config-lacks-hidden-size", _student_broken(_cfg_edit(lambda c: c.pop("hidden_size"))),
     ("student-model", "config.json", '"hidden_size"')),
    ("cli-llama-config-over-qwen2-weights", _student_broken(_swap_model_type("llama", "LlamaForCausalLM")),
     ("student-architecture", "unexpected", "q_proj.bias")),
    ("cli-missing-weight", _teacher_broken(_drop_tensor("model.norm.weight")), ("teacher-architecture", "model.norm.weight")),
    ("cli-truncated-tokenizer", _student_broken(lambda d: (d / "tokenizer.json").write_text("{\"version\": \"1.0\", ")),
     ("student-model", "tokenizer.json", "truncated?")),
    ("cli-teacher-tokenizer-missing", _teacher_broken(lambda d: (d / "tokenizer.json").unlink()),
     ("teacher tokenizer missing", "tokenizer.json")),
    ("cli-jsonl-null-text", _data("n.jsonl", J({"text": "hi"}) + "\n" + J({"text": None}) + "\n"), ("data-decode", "n.jsonl:2", "null")),
    ("cli-nine-token-corpus", _data("nine.txt", "hello world\n"), ("data-tokens", "9 tokens", "needs about 569")),
    ("cli-seq-len-beyond-context", _data("big.txt", "hello world again and again\n" * 2000, "data.seq_len=512"),
     ("data.seq_len=512", "max_position_embeddings=256")),
    ("cli-two-problems-one-line", lambda tmp, good: [*_student_broken(lambda d: (d / "tokenizer.json").write_text("["))(
        tmp, good), "--set", f"data.source={tmp}/gone.txt"], ("student-model", "tokenizer.json", "data-files", "gone.txt")),
]


@pytest.mark.parametrize("case,make,names", CLI_CASES, ids=_ids(CLI_CASES))
def test_cli_dry_run_refuses(case, make, names, good, tmp_path, capsys):
    code, err = cli(make(tmp_path, good), capsys)
    assert err.startswith("kdflow: error: ")
    assert_refused(code, err, names, tmp_path)
    assert not (tmp_path / "evidence").exists() or not any((tmp_path / "evidence").iterdir())


def test_cli_dry_run_of_good_inputs_passes(good, tmp_path, capsys):
    code = main(dry_run_args(tmp_path, *good))
    out = capsys.readouterr().out
    assert code == 0
    for check in ("student-architecture", "data-tokens", "teacher-model"):
        assert f"[ok] {check}" in out


# --------------------------------------------------------------------------- the real `kdflow` command, one process per case
KDFLOW = Path(sys.executable).parent / "kdflow"


def _kdflow(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [str(KDFLOW)] if KDFLOW.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=cwd)


def _cfg_file(text: bytes):
    def make(tmp: Path, good) -> list[str]:
        return ["run", str(_yaml(tmp, text)), "--dry-run"]
    return make


SUBPROCESS_CASES = [
    ("proc-yaml-not-utf8", _cfg_file(b"name: caf\xe9\n"), ("run.yaml", "not UTF-8")),
    ("proc-yaml-not-a-mapping", _cfg_file(b"just a string\n"), ("run.yaml", "mapping")),
    ("proc-temperature-inf", lambda tmp, good: dry_run_args(tmp, *good, "kd.temperature=.inf"), ("kd.temperature",)),
    ("proc-lr-inf", lambda tmp, good: dry_run_args(tmp, *good, "train.lr=.inf"), ("train.lr",)),
    ("proc-name-too-long", lambda tmp, good: dry_run_args(tmp, *good, "name=" + "n" * 240), ("name:", "NAME_MAX")),
    ("proc-truncated-safetensors", _student_broken(lambda d: _cut(1000)(d / "model.safetensors")),
     ("model.safetensors", "truncated")),
    ("proc-wrong-shape-header", _student_broken(lambda d: _edit(_shape_double)(d / "model.safetensors")),
     ("model.safetensors", "model.embed_tokens.weight", "wrong dtype or shape")),
    ("proc-config-not-json", _student_broken(_cfg_raw(b"{not json")), ("config.json", "not valid JSON")),
    ("proc-config-not-a-mapping", _teacher_broken(_cfg_raw(b"[1, 2, 3]")), ("config.json", "JSON object")),
    ("proc-config-lacks-hidden-size", _teacher_broken(_cfg_edit(lambda c: c.pop("hidden_size"))),
     ("config.json", '"hidden_size"')),
    ("proc-truncated-tokenizer", _student_broken(lambda d: (d / "tokenizer.json").write_bytes(
        (d / "tokenizer.json").read_bytes()[:2000])), ("tokenizer.json", "truncated?")),
    ("proc-teacher-tokenizer-missing", _teacher_broken(lambda d: (d / "tokenizer.json").unlink()),
     ("teacher tokenizer missing",)),
    ("proc-text-not-utf8", _data("latin.txt", "na\xefve\n".encode("latin-1")), ("latin.txt:1", "not UTF-8")),
    ("proc-corrupt-parquet", _data("bad.parquet", b"PAR1garbagePAR1"), ("bad.parquet", "parquet")),
    ("proc-jsonl-empty-text", _data("e.jsonl", J({"text": ""}) + "\n"), ("e.jsonl:1", "text is empty")),
    ("proc-nine-token-corpus", _data("nine.txt", "hello world\n"), ("needs about 569", "9 tokens")),
    ("proc-data-missing", lambda tmp, good: dry_run_args(tmp, *good, f"data.source={tmp}/gone.jsonl"),
     ("gone.jsonl", "no such file")),
    # a real run, not a dry run: refused before Prefect starts (no server, no flow run, no evidence folder)
    ("proc-run-truncated-safetensors", lambda tmp, good: [a for a in _student_broken(
        lambda d: _cut(1)(d / "model.safetensors"))(tmp, good) if a != "--dry-run"], ("model.safetensors", "truncated")),
]


@pytest.fixture(scope="module")
def kdflow_runs(good, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every subprocess case, run a few at a time (each is a fresh Python process: ~1 s of imports)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case):
        tmp = tmp_path_factory.mktemp(case[0])
        return case[0], (_kdflow(case[1](tmp, good), cwd=tmp), tmp)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, SUBPROCESS_CASES))


@pytest.mark.parametrize("case,make,names", SUBPROCESS_CASES, ids=_ids(SUBPROCESS_CASES))
def test_kdflow_command_refuses(case, make, names, kdflow_runs):
    proc, tmp = kdflow_runs[case]
    assert proc.stdout == ""  # nothing before the error line: no plan, no Prefect output
    assert proc.stderr.startswith("kdflow: error: "), proc.stderr
    assert_refused(proc.returncode, proc.stderr, names, tmp)


# --------------------------------------------------------------------------- an input error found inside the flow
@pytest.mark.slow
def test_input_error_inside_the_flow_is_one_line_without_traceback(good, tmp_path, prefect_server, capfd):
    """Preflight cannot see a vocabulary mismatch; the check_vocab task can. The run still exits 2
    with one line, Prefect logs no traceback for it, and the fail manifest says fail."""
    teacher = copy_model(good[0], tmp_path)
    _swap_two_tokens(teacher / "tokenizer.json")
    args = dry_run_args(tmp_path, teacher, good[1], "train.steps=2", "train.warmup_steps=0", "name=vocab-mismatch")
    args.remove("--dry-run")
    # what Prefect's console shows: a handler next to it, formatting records as it does (tracebacks included)
    import io
    import logging

    seen = io.StringIO()
    console = logging.StreamHandler(seen)
    logging.getLogger("prefect").addHandler(console)
    try:
        code = main(args)
    finally:
        logging.getLogger("prefect").removeHandler(console)
    captured = capfd.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("kdflow: error: ")]
    assert code == 2 and len(err_lines) == 1
    assert "tokenizers differ" in err_lines[0]
    assert "VocabError" in seen.getvalue()  # Prefect did log the failure...
    assert "Traceback" not in seen.getvalue() + captured.err + captured.out  # ...without a traceback
    manifest = json.loads((tmp_path / "evidence" / "vocab-mismatch" / "manifest.json").read_text())
    assert manifest["run"]["status"] == "fail"
    assert_no_pass_manifest(tmp_path)


# --------------------------------------------------------------------------- defence in depth: the steps refuse them too
LOAD_CASES = [  # preflight is skipped for hub models until they are pulled: loading must refuse these by itself
    ("load-llama-config-over-qwen2-weights", _swap_model_type("llama", "LlamaForCausalLM"), ("q_proj.bias", "unexpected")),
    ("load-missing-tensor", _drop_tensor("model.layers.0.mlp.up_proj.weight"), ("model.layers.0.mlp.up_proj.weight", "missing")),
]


@pytest.mark.parametrize("case,corrupt,names", LOAD_CASES, ids=_ids(LOAD_CASES))
def test_model_load_refuses_weights_that_do_not_fit(case, corrupt, names, good, tmp_path):
    from backends import get_backend

    student = copy_model(good[1], tmp_path)
    corrupt(student)
    refused(lambda: get_backend("hf").load(student), str(student), *names, root=tmp_path)


def test_data_step_refuses_a_null_record_too(good, tmp_path):
    """The data step (kd.data) checks every record itself, whatever preflight sampled."""
    from kd.data import prepare_data

    p = _write("n.jsonl", J({"text": "hello there"}) + "\n" + J({"text": None}) + "\n")(tmp_path)
    cfg = load_config(SMOKE, [f"data.source={p}", f"data.prepared_dir={tmp_path / 'prepared'}", "data.num_proc=1"])
    refused(lambda: prepare_data(cfg.data, good[1]), "n.jsonl:2", "null", root=tmp_path)


HUB_CASES = [  # a hub model is checked like a local folder once pulled (first thing check_vocab does)
    ("hub-wrong-dtype-header", lambda d: _set("dtype", "F16")(d / "model.safetensors"), ("model.safetensors", "dtype F16")),
    ("hub-config-lacks-hidden-size", _cfg_edit(lambda c: c.pop("hidden_size")), ("config.json", '"hidden_size"')),
]


@pytest.mark.parametrize("case,corrupt,names", HUB_CASES, ids=_ids(HUB_CASES))
def test_pulled_hub_model_is_checked_before_use(case, corrupt, names, good, hub, tmp_path):
    from kd.hub import pull_model
    from tasks.vocab import check_vocab

    student = copy_model(good[1], tmp_path)
    corrupt(student)
    hub.add_repo("org/student", student)
    cfg = load_config(SMOKE, [f"teacher.repo={good[0]}", "student.repo=org/student"])
    snaps = pull_model(cfg.teacher, "teacher"), pull_model(cfg.student, "student")
    refused(lambda: check_vocab.fn(cfg, *snaps), *names, root=tmp_path)


def test_there_are_at_least_90_bad_inputs():
    """The issue's bar: 90 distinct bad inputs, every one with its own id."""
    ids = [c[0] for group in (SAFETENSORS_CASES, WEIGHT_FOLDER_CASES, CONFIG_CASES, ARCH_CASES, TOKENIZER_CASES,
                              VOCAB_CASES, DATA_CASES, TOKEN_CASES, CONFIG_FILE_CASES, NAME_CASES, CLI_CASES,
                              SUBPROCESS_CASES, LOAD_CASES, HUB_CASES) for c in group]
    ids += ["model-folder-missing", "tok-teacher-missing-preflight", "tok-teacher-missing-vocab-check",
            "data-jsonl-custom-field-missing", "config-file-missing", "flow-vocab-tokens-differ", "data-step-null-record"]
    assert len(ids) == len(set(ids))
    assert len(SUBPROCESS_CASES) >= 15
    assert len(ids) >= 90, len(ids)
