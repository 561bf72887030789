"""Chat templates rendered per side (kd/cross_tokenizer/chat.py, issue 30 item 2) on real pairs: SmolLM2's
tokenizer as the teacher's (its own chat template), Qwen2's as the student's (its own template) and GPT-2's (none:
the student takes the teacher's template text). The teacher's ids of a conversation are exactly its
apply_chat_template's; content groups hold the same bytes on both sides, inside message contents, no markup
token in them; each content byte is in one group at most, all of them where no token straddles a content edge;
with train_on: assistant the trained groups are the assistant contents; stored groups == aligned on the fly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd.config import load_config
from kd.cross_tokenizer.blocks import plan_batch
from kd.cross_tokenizer.chat import align_chat_blocks, align_chat_doc, chat_docs, chat_templates, render
from kd.cross_tokenizer.report import special_ids
from kd.cross_tokenizer.stored import stored_groups, stored_rows
from kd.cross_tokenizer.student import adopt_chat_template
from kd.cross_tokenizer.vocab_files import TEACHER, tokenizer_folder
from kd.data import IGNORE, open_prepared, prepare_data
from kd.data.encode import chat_template_of
from kd.data.prepared import SPLITS
from tests.cross_tokenizer_pairs import real_pair
from tests.test_cross_tokenizer_stored import _same

CHAT = Path(__file__).resolve().parent.parent / "kd" / "corpus" / "chat" / "genesis-chat.jsonl"
EDGY = [  # emoji, CJK, digit runs, whitespace at content edges, a content that names a role, an empty turn
    [{"role": "user", "content": "Hi there 你好 1234567"}, {"role": "assistant", "content": "Hello!  How are you? 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\n  user"},
     {"role": "assistant", "content": " assistant\n\n"}, {"role": "user", "content": ""},
     {"role": "assistant", "content": "3.14159 is pi"}],
]


def conversations(n: int = 40) -> list[list[dict]]:
    with open(CHAT, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f][:n] + EDGY


def student_template(name: str) -> str | None:
    """The student's template: its own, or the teacher's text where it has none (student.py's rule)."""
    return chat_template_of(tokenizer_folder(name)) or chat_template_of(tokenizer_folder(TEACHER))


def aligned(name: str, msgs: list[dict]):
    pair, st = real_pair(name), student_template(name)
    s_text = render(pair.student, msgs, st).text
    ids = pair.student(s_text, add_special_tokens=False)["input_ids"]
    return pair, ids, align_chat_doc(pair, ids, msgs, None, st)


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_teacher_reads_its_own_chat_template(name):
    for msgs in conversations(8):
        pair, _, seg = aligned(name, msgs)
        want = pair.teacher.apply_chat_template(msgs, tokenize=True)["input_ids"]
        assert seg.teacher_ids.tolist() == list(want)
        assert seg.teacher_round_trip


def _token_spans(ends) -> list[tuple[int, int]]:
    ends = np.asarray(ends, dtype=np.int64)
    return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist()))


def _side_groups(seg, bounds, ends, spans):
    """Per content group: the byte range it spans on this side, checked to lie inside one content span."""
    toks = _token_spans(ends)
    out = []
    for g in np.flatnonzero(seg.content):
        a, b = toks[bounds[g]][0], toks[bounds[g + 1] - 1][1]
        inside = [k for k, sp in enumerate(spans) if sp is not None and sp[0] <= a and b <= sp[1]]
        assert len(inside) == 1, f"group {g} bytes {a}:{b} are not inside one message content"
        out.append((inside[0], a - spans[inside[0]][0], b - spans[inside[0]][0]))
    return out


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_content_groups_cover_the_same_content_bytes_once(name):
    """Both sides' content groups span the same bytes of the same message; no group holds a markup token (every
    token of a content group lies inside a content); each content byte is in one group at most, and a content
    byte left out sits at an edge of its content (a token there also carries markup)."""
    clean, n_bytes, n_covered = 0, 0, 0
    for msgs in conversations():
        pair, ids, seg = aligned(name, msgs)
        st = student_template(name)
        s_r, t_r = render(pair.student, msgs, st), render(pair.teacher, msgs, None)
        s_ends = np.cumsum([len(pair.student_bytes.pieces[i]) for i in ids])
        t_ends = np.cumsum([len(pair.teacher_bytes.pieces[i]) for i in seg.teacher_ids])
        s_groups = _side_groups(seg, seg.student_bounds, s_ends, s_r.spans)
        t_groups = _side_groups(seg, seg.teacher_bounds, t_ends, t_r.spans)
        assert s_groups == t_groups  # the same message, the same bytes of it
        for g, (_, a, b) in zip(np.flatnonzero(seg.content), s_groups):
            assert seg.byte_bounds[g + 1] - seg.byte_bounds[g] == b - a
        assert int(np.diff(seg.byte_bounds)[~seg.content].sum()) == 0  # markup counts no bytes
        all_clean = True
        for k, m in enumerate(msgs):
            n = len(m["content"].encode())
            cover = np.zeros(n, int)
            for j, a, b in s_groups:
                if j == k:
                    cover[a:b] += 1
            assert cover.max(initial=0) <= 1
            if n and cover.any():
                first, last = np.flatnonzero(cover)[[0, -1]]
                assert cover[first : last + 1].all()  # left out only at the edges
            elif n:
                assert not m["content"].strip() or len(m["content"]) < 3 or s_r.spans[k] is None
            all_clean &= bool(cover.all())
            n_bytes, n_covered = n_bytes + n, n_covered + int(cover.sum())
        clean += all_clean
    if name == "qwen2":  # its template's markup is special tokens: only content edges that are whitespace merge
        assert clean >= 40 and n_covered / n_bytes > 0.999
    else:  # GPT-2 reads the teacher's markup as text: a final "." merges with "<|" (".<"), so it is left out
        assert n_covered / n_bytes > 0.98


def test_exactly_once_where_no_token_straddles_an_edge():
    msgs = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello there 123 你好"}]
    for name in ("qwen2", "gpt2"):
        pair, _, seg = aligned(name, msgs)
        n_content = sum(len(m["content"].encode()) for m in msgs)
        assert int(np.diff(seg.byte_bounds)[seg.content].sum()) == n_content


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def chat_set(request, tmp_path_factory):
    """genesis-chat prepared for the student (train_on: assistant) and its stored groups."""
    name = request.param
    tmp = tmp_path_factory.mktemp(f"chat-{name}")
    t_dir, s_dir = tokenizer_folder(TEACHER), tmp / "student"
    shutil.copytree(tokenizer_folder(name), s_dir)
    assert adopt_chat_template(s_dir, t_dir) == ("own" if name == "qwen2" else "teacher")
    data = load_config("configs/smollm2-135m-chat.yaml", [f"data.prepared_dir={tmp / 'prepared'}"]).data
    assert data.format == "chat" and data.train_on == "assistant"
    root = prepare_data(data, s_dir).path
    return real_pair(name), t_dir, s_dir, root


def test_stored_chat_groups_equal_on_the_fly(chat_set):
    pair, t_dir, s_dir, root = chat_set
    groups, ps = stored_groups(root, pair, t_dir, s_dir), open_prepared(root)
    specials, templates = special_ids(pair.student), chat_templates(t_dir, s_dir)
    n_chat = 0
    for name in SPLITS:
        split, docs = getattr(ps, name), chat_docs(ps, name)
        b = split.batch(range(min(len(split), 24)))
        stored = stored_rows(groups, b)
        fly = align_chat_blocks(pair, b.ids.numpy(), b.position_ids.numpy(), [docs[r] for r in b.rows], specials,
                                templates)
        assert [len(r) for r in stored] == [len(r) for r in fly]
        assert all(_same(x, y) for rs, rf in zip(stored, fly) for x, y in zip(rs, rf))
        args = (pair, b.ids.numpy(), b.position_ids.numpy(), b.labels.numpy(), specials, IGNORE)
        assert _same(plan_batch(*args, segments=stored), plan_batch(*args, segments=fly))
        n_chat += sum(not s.content.all() for r in fly for s in r)  # conversations aligned per side
    assert n_chat > 10


def test_trained_groups_are_the_assistant_contents(chat_set):
    """train_on: assistant: a group is trained exactly when it is content of an assistant message (on both sides,
    since the two sides' groups hold the same bytes); no markup group and no user/system content is trained."""
    pair, t_dir, s_dir, root = chat_set
    ps = open_prepared(root)
    groups, docs = stored_groups(root, pair, t_dir, s_dir)["train"], chat_docs(ps, "train")
    _, st = chat_templates(t_dir, s_dir)
    b = ps.train.batch(range(min(len(ps.train), 16)))
    labels = b.labels.numpy()
    n_kept, n_markup_labelled = 0, 0
    for r, (segs, row) in enumerate(zip(groups.rows(b.rows), [docs[int(x)] for x in b.rows])):
        assert len(segs) == len(row)  # one Segment per conversation
        for seg, d in zip(segs, row):
            spans = render(pair.student, d.messages, st).spans
            ends = np.cumsum([len(pair.student_bytes.pieces[i]) for i in b.ids[r, seg.start : seg.stop].tolist()])
            toks = _token_spans(ends)
            for g in range(1, len(seg.content)):  # the first group has no prediction on the teacher side
                p, q = seg.start + seg.student_bounds[g], seg.start + seg.student_bounds[g + 1]
                trained = bool((labels[r, p - 1 : q - 1] != IGNORE).all())
                a, e = toks[seg.student_bounds[g]][0], toks[seg.student_bounds[g + 1] - 1][1]
                role = next((m["role"] for m, sp in zip(d.messages, spans) if sp and sp[0] <= a and e <= sp[1]), None)
                if seg.content[g]:
                    assert trained == (role == "assistant"), (g, role)
                    n_kept += trained
                else:
                    n_markup_labelled += trained  # an assistant turn's end-of-turn markup: labelled, not compared
    plan = plan_batch(pair, b.ids.numpy(), b.position_ids.numpy(), labels, special_ids(pair.student), IGNORE,
                      segments=groups.rows(b.rows))
    assert n_kept > 50 and int(plan.keep.sum()) == n_kept and n_markup_labelled > 0


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_a_truncated_conversation_aligns_its_prefix(name):
    """data.overlong: truncate keeps a prefix of the student's tokens: the teacher reads its own rendering up to the
    same content byte, and the content groups still hold the same bytes of the same messages on both sides."""
    msgs = conversations(3)[2]
    pair, ids, _ = aligned(name, msgs)
    st = student_template(name)
    s_spans, t_r = render(pair.student, msgs, st).spans, render(pair.teacher, msgs, None)
    full = pair.teacher.apply_chat_template(msgs, tokenize=True)["input_ids"]
    for k in range(len(ids) // 2, len(ids), 3):
        seg = align_chat_doc(pair, ids[:k], msgs, None, st)
        assert seg.stop == k and seg.student_bounds[-1] == k and seg.teacher_bounds[-1] == len(seg.teacher_ids)
        assert len(seg.teacher_ids) < len(full) and t_r.text.encode().startswith(
            b"".join(pair.teacher_bytes.pieces[i] for i in seg.teacher_ids))
        s_ends = np.cumsum([len(pair.student_bytes.pieces[i]) for i in ids[:k]])
        t_ends = np.cumsum([len(pair.teacher_bytes.pieces[i]) for i in seg.teacher_ids])
        assert _side_groups(seg, seg.student_bounds, s_ends, s_spans) == \
            _side_groups(seg, seg.teacher_bounds, t_ends, t_r.spans)
