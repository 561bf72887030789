"""The prepare_data step: formats and loss masks, packing without leakage, the split by document,
bad records, reuse, and training/eval reading the prepared set without tokenising again."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.config import DataConfig, load_config
from kd.data import open_prepared, prepare_data, train_batch
from kd.errors import DataError

CHATML = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_student(tiny_pair, tmp_path_factory):
    """The tiny student with a ChatML-like chat template (the generated one has none)."""
    d = tmp_path_factory.mktemp("chat") / "student"
    shutil.copytree(tiny_pair[1], d)
    (d / "chat_template.jinja").write_text(CHATML)
    return d


def _conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"what is {i % 7} plus two?"},
                {"role": "assistant", "content": f"it is {i % 7 + 2}."}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "and the colour of snow?"}, {"role": "assistant", "content": "white."}]
        out.append({"messages": msgs})
    return out


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _cfg(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), prepared_dir=str(tmp_path / "prepared"), **kw)


def _decode(student, ids) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(student) / "tokenizer.json")).decode([int(i) for i in ids],
                                                                             skip_special_tokens=False)


def test_chat_loss_only_on_assistant_turns(tmp_path, chat_student):
    src = _jsonl(tmp_path / "chat.jsonl", _conversations(40))
    r = prepare_data(_cfg(tmp_path, src, seq_len=128), chat_student)
    assert r.format == "chat" and r.counts["documents"] == 40
    ps = open_prepared(r.path)
    start, length, _, line = ps.train.docs()[0]
    ids, tgt = ps.train.tokens[start:start + length], ps.train.targets[start:start + length].astype(bool)
    conv = _conversations(40)[line - 1]["messages"]
    trained = _decode(chat_student, ids[tgt])
    assert all(m["content"] in trained for m in conv if m["role"] == "assistant")
    assert not any(m["content"] in trained for m in conv if m["role"] == "user")
    assert "⟦" in r.samples[0] and "it is" in r.samples[0].split("⟧")[1]  # artifact shows the masked part

    last = prepare_data(_cfg(tmp_path, src, seq_len=128, train_on="assistant_last"), chat_student)
    assert last.counts["target_tokens"] < r.counts["target_tokens"]
    every = prepare_data(_cfg(tmp_path, src, seq_len=128, train_on="all"), chat_student)
    assert every.counts["target_tokens"] > r.counts["target_tokens"]


def test_prompt_completion_loss_on_completion(tmp_path, tiny_pair):
    recs = [{"prompt": f"the capital of peru is", "completion": f" lima {i}."} for i in range(30)]
    r = prepare_data(_cfg(tmp_path, _jsonl(tmp_path / "pc.jsonl", recs), seq_len=64), tiny_pair[1])
    ps = open_prepared(r.path)
    start, length, _, _ = ps.train.docs()[0]
    tgt = ps.train.targets[start:start + length].astype(bool)
    trained = _decode(tiny_pair[1], ps.train.tokens[start:start + length][tgt])
    assert r.format == "prompt_completion" and "lima" in trained and "capital" not in trained
    assert trained.endswith("<|endoftext|>")  # the EOS is learnt too


def test_packed_conversation_has_the_same_per_token_losses_as_alone(tmp_path, chat_student):
    """Position ids restart per document: attention is block-diagonal, nothing leaks across documents."""
    from transformers import AutoModelForCausalLM

    r = prepare_data(_cfg(tmp_path, _jsonl(tmp_path / "c.jsonl", _conversations(40)), seq_len=256), chat_student)
    ps = open_prepared(r.path)
    docs = ps.train.docs()
    block = docs[:, 0] // 256
    b = int(np.bincount(block).argmax())
    in_block = docs[block == b]
    assert len(in_block) >= 3  # several conversations share this block
    start, length = int(in_block[-1][0]), int(in_block[-1][1])  # the last one: most context before it
    model = AutoModelForCausalLM.from_pretrained(chat_student).eval()
    batch = ps.train.batch([b])
    off = start - b * 256

    def token_losses(ids, pos=None):
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, :-1]  # as kdflow runs it
        return F.cross_entropy(logits, ids[0, 1:], reduction="none")

    alone = token_losses(batch.ids[:, off:off + length])
    packed = token_losses(batch.ids, batch.position_ids)[off:off + length - 1]
    assert torch.allclose(alone, packed, atol=1e-5, rtol=0), (alone - packed).abs().max()
    leaky = token_losses(batch.ids)[off:off + length - 1]  # plain causal attention over the whole block
    assert (alone - leaky).abs().max() > 1e-3  # so the check above could fail
    labels = batch.labels[0, off:off + length - 1]
    assert bool((labels != -100).any()) and bool((labels[: 3] == -100).all())  # user prompt masked


def test_split_is_by_document(tmp_path, tiny_pair):
    lines = [" ".join(f"the colour {i} {j} is green." for j in range(1 + i % 13)) for i in range(200)]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    r = prepare_data(_cfg(tmp_path, tmp_path / "c.txt", seq_len=32, heldout_fraction=0.2), tiny_pair[1])
    ps = open_prepared(r.path)
    train, held = ps.train.docs(), ps.heldout.docs()
    assert len(held) == 40 and len(train) == 160  # documents, not blocks
    assert not set(train[:, 3]) & set(held[:, 3]) and set(train[:, 3]) | set(held[:, 3]) == set(range(1, 201))
    for split, docs in ((ps.train, train), (ps.heldout, held)):  # each document whole, on one side
        for start, length, _, line in docs[:25]:
            assert _decode(tiny_pair[1], split.tokens[start:start + length]) == lines[line - 1] + "<|endoftext|>"
    again = prepare_data(_cfg(tmp_path, tmp_path / "c.txt", seq_len=32, heldout_fraction=0.2), tiny_pair[1])
    assert again.reused and again.content_hash == r.content_hash


def test_long_text_documents_are_split_into_segments(tmp_path, tiny_pair):
    long = " ".join(f"one plus two is three {i}." for i in range(40))
    (tmp_path / "c.txt").write_text("\n".join([long] * 6 + ["short one."] * 6) + "\n")
    r = prepare_data(_cfg(tmp_path, tmp_path / "c.txt", seq_len=32), tiny_pair[1])
    ps = open_prepared(r.path)
    pos = np.asarray(ps.train.positions).reshape(-1, 32)
    assert (pos[:, 0] == 0).all() and pos.max() == 31  # every block starts a segment
    b = ps.train.batch(list(range(len(ps.train))))
    assert ((b.position_ids[:, 1:] == 0) <= (b.labels == -100)).all()  # a segment start is never a label


@pytest.mark.parametrize("mode,expect", [("truncate", "truncated"), ("drop", "dropped"), ("error", None)])
def test_overlong_records(tmp_path, chat_student, mode, expect):
    convs = _conversations(20)
    convs[4]["messages"][1]["content"] = "it is " + "very " * 200 + "long."
    src = _jsonl(tmp_path / "c.jsonl", convs)
    cfg = _cfg(tmp_path, src, seq_len=128, overlong=mode)
    if expect is None:
        with pytest.raises(DataError, match=r"c\.jsonl:5: record has \d+ tokens, more than data.seq_len=128"):
            prepare_data(cfg, chat_student)
        return
    r = prepare_data(cfg, chat_student)
    assert r.counts[expect] == 1 and r.counts["documents"] == 20


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     r"bad\.jsonl:3: messages\[1\]\.role: 'bot' is not one of system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]},
     r"bad\.jsonl:3: messages\[1\]\.content: is int, not a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:3: messages: conversation has no assistant turn"),
    ({"messages": None}, r"bad\.jsonl:3: messages: is NoneType, not a list"),
    ('{"messages": [', r"bad\.jsonl:3: not valid JSON"),
])
def test_bad_chat_records_name_file_line_and_field(tmp_path, chat_student, record, message):
    recs = _conversations(20)
    recs.insert(2, record)
    src = _jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=message):
        prepare_data(_cfg(tmp_path, src, seq_len=64), chat_student)
    r = prepare_data(_cfg(tmp_path, src, seq_len=64, bad_records="skip"), chat_student)
    assert r.counts["skipped"] == 1 and r.counts["documents"] == 20 and sum(r.skipped.values()) == 1


@pytest.mark.parametrize("value,message", [(None, "text: is null"), (3, "text: is int, not a string"),
                                           ("  ", "text: is empty"), ("MISSING", "record has no field 'text'")])
def test_bad_text_records(tmp_path, tiny_pair, value, message):
    recs = [{"text": f"the cat sees the dog {i}."} for i in range(30)]
    recs[6] = {"other": 1} if value == "MISSING" else {"text": value}
    with pytest.raises(DataError, match=rf"bad\.jsonl:7: (text: )?{message}"):
        prepare_data(_cfg(tmp_path, _jsonl(tmp_path / "bad.jsonl", recs), seq_len=32), tiny_pair[1])


def test_bad_parquet_row_is_named(tmp_path, tiny_pair):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"the capital of peru is lima {i}." for i in range(30)]
    texts[11] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: row 11: text: is null"):
        prepare_data(_cfg(tmp_path, tmp_path / "c.parquet", seq_len=32), tiny_pair[1])
    r = prepare_data(_cfg(tmp_path, tmp_path / "c.parquet", seq_len=32, bad_records="skip"), tiny_pair[1])
    assert r.skipped == {"null": 1} and r.counts["documents"] == 29


def test_chat_data_needs_a_chat_template(tmp_path, tiny_pair):
    src = _jsonl(tmp_path / "c.jsonl", _conversations(5))
    with pytest.raises(DataError, match=r"tokenizer_config\.json: the student's tokenizer has no chat template"):
        prepare_data(_cfg(tmp_path, src, seq_len=64), tiny_pair[1])


def test_every_label_masked_is_an_error(tmp_path, tiny_pair):
    recs = [{"prompt": "the capital of peru is lima " * 8, "completion": " lima."} for _ in range(10)]
    src = _jsonl(tmp_path / "pc.jsonl", recs)
    with pytest.raises(DataError, match=r"pc\.jsonl:1: no token carries the loss after data.overlong=truncate"):
        prepare_data(_cfg(tmp_path, src, seq_len=16), tiny_pair[1])
    with pytest.raises(DataError, match="every label in the training split is masked"):
        prepare_data(_cfg(tmp_path, src, seq_len=16, bad_records="skip"), tiny_pair[1])


def test_training_and_eval_read_the_prepared_set_without_tokenising(tmp_path, tiny_pair, chat_student,
                                                                    monkeypatch):
    from backends import get_backend
    from kd.data.encode import RecordEncoder
    from kd.evaluate import evaluate_model
    from kd.train.loop import train_student
    from kd.vocab import align_vocab

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair[0], teacher)
    (teacher / "chat_template.jinja").write_text(CHATML)
    src = _jsonl(tmp_path / "c.jsonl", _conversations(60))
    cfg = load_config("configs/smoke.yaml", ["train.steps=3", "train.warmup_steps=1", "train.batch_size=4", f"data.source={src}",
                                             "data.seq_len=128", f"data.prepared_dir={tmp_path / 'prepared'}"])
    r = prepare_data(cfg.data, chat_student)

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(RecordEncoder, "encode", no_tokenising)
    ps = open_prepared(r.path)
    al = align_vocab(teacher, chat_student)
    result = train_student(cfg, teacher, chat_student, al, ps, tmp_path / "run")
    assert result.final_loss == result.final_loss and Path(result.heldout_path) == Path(r.path)
    be = get_backend("hf")
    m = evaluate_model(be.load(result.checkpoint_dir), None, open_prepared(result.heldout_path).heldout,
                       rows_kept=al.rows_kept, valid_vocab=al.valid_vocab, batch_size=4)
    assert m.tokens == r.counts["heldout_target_tokens"]  # eval scores exactly the tokens training would
    assert train_batch(ps.train, step=0, micro=0, batch_size=2, grad_accum=1, seed=0).labels.shape == (2, 127)


@pytest.mark.slow
def test_bad_chat_data_through_the_cli_exits_2_and_leaves_fail_evidence(tmp_path, prefect_server, tiny_pair, capsys,
                                                                        chat_student):
    """The real `kdflow run`: the prepare_data task fails on a bad record, the CLI exits 2 with one line
    naming file, line and field, and the evidence says fail."""
    from flows.cli import main

    recs = _conversations(30)
    recs[7]["messages"][0]["role"] = "human"
    src = _jsonl(tmp_path / "chat.jsonl", recs)
    code = main(["run", "configs/smoke.yaml", "--evidence-dir", str(tmp_path / "ev"), "--set", f"data.source={src}",
                 "--set", f"work_dir={tmp_path / 'runs'}", "--set", f"data.prepared_dir={tmp_path / 'prep'}",
                 "--set", f"student.repo={chat_student}", "--set", f"teacher.repo={chat_student}",
                 "--set", "data.seq_len=128", "--set", "train.steps=2", "--set", "train.warmup_steps=1"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "chat.jsonl:8: messages[0].role: 'human' is not one of system, user, assistant, tool" in err
    manifest = json.loads(next((tmp_path / "ev").glob("*/manifest.json")).read_text())
    assert manifest["run"]["status"] == "fail" and manifest["data"] is None
