"""Chat conversations rendered per side (issue 30 item 2): each side reads a conversation in its own chat template.

    r = render(tokenizer, messages, template)       # Rendered: the text, each message content's UTF-8 byte span
    seg = align_chat_doc(pair, student_ids, messages, teacher_template, student_template)   # Segment or None
    rows = align_chat_blocks(pair, ids, position_ids, docs, templates)   # (B, L) -> list[list[Segment]]

The prepared set holds a conversation as the student's template rendered it, tokenized by the student. The teacher
reads the same conversation rendered by *its own* template and tokenized by its tokenizer (the ids equal
`teacher.apply_chat_template(messages, tokenize=True)`'s): it predicts an answer in the context format it was
trained on. The two renderings share only the message contents (the same bytes on both sides); the markup around
them (role headers, end-of-turn tokens, a template's default system prompt) has no counterpart on the other side.
So one conversation (one document of a block) is one Segment whose groups tile both sides' tokens in order:

- inside each message content rendered on both sides, TRL GOLD's byte-aligned groups (align.py's group_bounds);
- every run of markup between contents is one group, flagged `content = False`: not compared by the cross loss
  nor by the eval (plan_batch drops it like an untrained group). Its bytes count as 0 (bits per byte are over
  content bytes, which are the same on both sides).

A token that straddles a content edge (a content starting with whitespace that merges with the template's "\\n")
goes to the markup run; the content bytes it covers on one side are left out on both (the content groups start
at the first byte where a token starts on both sides, and end at the last where one ends on both). A message
that one template does not render (Phi-3's drops system messages) is markup on the side that renders it. With
`data.train_on: assistant` the student's labels carry the assistant turns (content and end-of-turn markup); a
content group counts when all its student tokens are labelled, so the cross loss is on the assistant contents,
on both sides. The end of each assistant turn is distilled apart (kd/cross_tokenizer/losses.py's end-of-turn
term): a Segment's `end_of_turn` rows name, per assistant turn rendered whole on both sides, the tokens of the
event "the content ends here and the markup begins" on each side: from the end of the turn's last content group
to the first token that reaches past the content's last byte (the teacher's `<|im_end|>`; a Qwen2 student's own
`<|im_end|>`; a GPT-2 student reading the template as text: `<`, or `.<` with the answer's final `.`).

A template that changes a message's content (strips or escapes it) cannot be split into markup and content and
is refused. A student whose tokenizer has no chat template gets the teacher's template text at transplant time
(kd/cross_tokenizer/student.py: recorded as `chat_template: "teacher"` in its init report); a teacher whose
tokenizer has none reads the student's template (`templates`).

align_chat_blocks needs each document's conversation: the stored groups (stored.py) read them from the prepared
set's source records (docs.bin names each document's file and line). A document whose student tokens are not the
student template's rendering of its record (a changed template) falls back to blocks.py's plain pieces.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd.cross_tokenizer.align import TokenizerPair, group_bounds
from kd.cross_tokenizer.blocks import Segment, align_blocks
from kd.cross_tokenizer.token_bytes import byte_ends
from kd.errors import DataError

SENTINEL = "\x00kdflow-content-{}\x00"


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list  # per message: (byte start, byte end) of its content in text.encode(), or None (not rendered)


def render(tok, messages: list[dict], template: str | None) -> Rendered:
    """The conversation as `template` renders it (the tokenizer's own when None), and each content's byte span.
    Rendered once more with a sentinel for each content: the text between the sentinels is the template's markup."""
    apply = lambda ms: tok.apply_chat_template(ms, chat_template=template, tokenize=False)  # noqa: E731
    text = apply(messages)
    marks = [SENTINEL.format(i) for i in range(len(messages))]
    rest = apply([{**m, "content": s} for m, s in zip(messages, marks)])
    out, spans, n = [], [], 0
    for m, s in zip(messages, marks):
        before, sep, after = rest.partition(s)
        if not sep:
            spans.append(None)  # the template does not render this message
            continue
        out.append(before)
        n += len(before.encode())
        spans.append((n, n + len(m["content"].encode())))
        out.append(m["content"])
        n = spans[-1][1]
        rest = after
    out.append(rest)
    if "".join(out) != text:
        raise DataError("the chat template changes message contents (or renders them depending on their text), so "
                        "its markup cannot be told from the contents for cross-tokenizer groups; use a template "
                        "that inserts each content verbatim")
    return Rendered(text, spans)


def _cut(text: str, n_bytes: int) -> str:
    """text's first n_bytes bytes, backed off to a character boundary."""
    b = text.encode()[:n_bytes]
    return b.decode("utf-8", errors="ignore")


def _inner(ends: np.ndarray, lo: int, hi: int) -> set:
    """The byte boundaries (relative to lo) of the tokens lying wholly inside bytes [lo, hi)."""
    starts = np.concatenate([[0], ends[:-1]])
    inside = (starts >= lo) & (ends <= hi) & (ends > starts)
    return {int(x) - lo for x in starts[inside]} | {int(x) - lo for x in ends[inside]}


def _turn_end(s_ends, t_ends, s1: int, t1: int, e_s: int, e_t: int) -> tuple[int, int, int, int] | None:
    """The end of an assistant turn whose content ends at byte e_s (student) / e_t (teacher) and whose content
    groups end at tokens s1 / t1: (s1, k_s + 1, t1, k_t + 1), k the first token on each side that reaches past the
    content's end (the first token of that side's end-of-turn markup); None when a side has no such token (the
    conversation is truncated there)."""
    k_s, k_t = int(np.searchsorted(s_ends, e_s, side="right")), int(np.searchsorted(t_ends, e_t, side="right"))
    if k_s >= len(s_ends) or k_t >= len(t_ends):
        return None
    return s1, k_s + 1, t1, k_t + 1


def _runs(s_ends, t_ends, s_spans, t_spans, assistant=None) -> tuple[list[tuple[int, int, int, bool]], list]:
    """(student tokens, teacher tokens, content bytes, is content) per group, in order over both sides, and the
    assistant turns' ends (_turn_end; assistant: per span pair, the message is the assistant's)."""
    runs, ends, si, ti = [], [], 0, 0
    for k, ((a, b), (c, d)) in enumerate(zip(s_spans, t_spans)):
        n = min(b - a, d - c)
        if n <= 0:
            continue
        sbd, tbd = _inner(s_ends, a, a + n), _inner(t_ends, c, c + n)
        common = sorted(sbd & tbd)
        if len(common) < 2:
            continue
        lo, hi = common[0], common[-1]
        s0, s1 = (int(x) for x in np.searchsorted(s_ends, [a + lo, a + hi], side="right"))
        t0, t1 = (int(x) for x in np.searchsorted(t_ends, [c + lo, c + hi], side="right"))
        runs.append((s0 - si, t0 - ti, 0, False))
        tb, sb, bb = group_bounds(t_ends[t0:t1] - (c + lo), s_ends[s0:s1] - (a + lo))
        runs.extend(zip(np.diff(sb).tolist(), np.diff(tb).tolist(), np.diff(bb).tolist(), [True] * (len(sb) - 1)))
        si, ti = s1, t1
        end = _turn_end(s_ends, t_ends, s1, t1, a + n, c + n) if assistant is not None and assistant[k] else None
        if end is not None:
            ends.append(end)
    runs.append((len(s_ends) - si, len(t_ends) - ti, 0, False))
    return _merge_one_sided(runs), ends


def _merge_one_sided(runs: list) -> list:
    """A markup run with tokens on one side only joins the next run (the last one the previous): a group needs
    tokens on both sides. The joined group is markup."""
    out, carry = [], None
    for r in runs:
        if carry is not None:
            r, carry = (r[0] + carry[0], r[1] + carry[1], 0, False), None
        if r[0] == 0 and r[1] == 0:
            continue
        if r[0] == 0 or r[1] == 0:
            carry = r
            continue
        out.append(r)
    if carry is not None and out:
        p = out.pop()
        out.append((p[0] + carry[0], p[1] + carry[1], 0, False))
    return out


def align_chat_doc(pair: TokenizerPair, student_ids, messages: list[dict], teacher_template: str | None,
                   student_template: str | None) -> Segment | None:
    """One conversation's student tokens (as prepared: the student template's rendering, possibly truncated)
    -> a Segment over them (start 0) with the teacher's tokens of its own rendering (module docstring); None when
    the tokens are not the student template's rendering of `messages`."""
    ids = np.asarray(student_ids, dtype=np.int64)
    chunks = [pair.student_bytes.pieces[i] for i in ids.tolist()]
    if not len(ids) or any(len(c) == 0 for c in chunks):
        return None
    s_r, t_r = render(pair.student, messages, student_template), render(pair.teacher, messages, teacher_template)
    s_bytes = b"".join(chunks)
    if not s_r.text.encode().startswith(s_bytes):
        return None
    both = [(s, t, m["role"] == "assistant") for s, t, m in zip(s_r.spans, t_r.spans, messages)
            if s is not None and t is not None]
    covered = len(s_bytes)  # a truncated conversation is a prefix of the rendering
    both = [((a, min(b, covered)), (c, c + min(b, covered) - a), r) for (a, b), (c, _), r in both if a < covered]
    s_spans, t_spans, assistant = [s for s, _, _ in both], [t for _, t, _ in both], [r for _, _, r in both]
    t_text = t_r.text if covered == len(s_r.text.encode()) else _cut(t_r.text, t_spans[-1][1] if t_spans else 0)
    t = byte_ends(pair.teacher, pair.teacher_bytes, t_text)
    if not len(t.ids):
        return None
    s_ends = np.cumsum(np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks)))
    runs, ends = _runs(s_ends, np.asarray(t.ends, dtype=np.int64), s_spans, t_spans, assistant)
    if not runs:
        return None
    n_s, n_t, n_b, content = (np.asarray(x) for x in zip(*runs))
    cum = lambda x: np.concatenate([[0], np.cumsum(x)]).astype(np.int32)  # noqa: E731
    return Segment(0, len(ids), t.ids, cum(n_s), cum(n_t), t.round_trip, cum(n_b), content.astype(bool),
                   np.asarray(ends, dtype=np.int32).reshape(-1, 4))


@dataclass(frozen=True)
class ChatDoc:
    """A conversation's place in a block row: student positions start..start+length-1, and its messages."""

    start: int
    length: int
    messages: list


def align_chat_blocks(pair: TokenizerPair, ids, position_ids, docs: list[list[ChatDoc]], special_ids: set[int],
                      templates: tuple[str | None, str | None]) -> list[list[Segment]]:
    """(B, L) student ids of chat documents, each row's ChatDocs, (teacher, student) templates -> each row's
    Segments: one per conversation (align_chat_doc), or blocks.py's plain pieces where that gives None."""
    ids = np.asarray(ids, dtype=np.int64)
    out = []
    for r, row in enumerate(docs):
        segs = []
        for d in row:
            span = slice(d.start, d.start + d.length)
            seg = align_chat_doc(pair, ids[r, span], d.messages, *templates)
            if seg is None:
                pos = None if position_ids is None else np.asarray(position_ids)[r, span][None]
                segs.extend(dataclasses.replace(s, start=s.start + d.start, stop=s.stop + d.start)
                            for s in align_blocks(pair, ids[r, span][None], pos, special_ids)[0])
            else:
                segs.append(dataclasses.replace(seg, start=d.start, stop=d.start + d.length))
        out.append(segs)
    return out


def _records(path: Path, kind: str, lines: set[int], messages_field: str) -> dict[int, list]:
    """{line: messages} of the source records at those lines (1-based for .jsonl, row numbers otherwise)."""
    out = {}
    if kind == "json":
        with open(path, encoding="utf-8") as f:
            for k, raw in enumerate(f, start=1):
                if k in lines:
                    out[k] = json.loads(raw)[messages_field]
        return out
    import tempfile

    from kd.data.sources import file_dataset

    with tempfile.TemporaryDirectory() as tmp:
        ds, _ = file_dataset(path, tmp)
        for k in sorted(lines):
            out[k] = ds[k][messages_field]
    return out


def chat_docs(prepared, split: str) -> list[list[ChatDoc]]:
    """Each block row's conversations in one split of a chat prepared set (kd.data.PreparedSet): where docs.bin
    puts them, with their messages read back from the source records."""
    from kd.data.sources import file_kind

    sp, m = getattr(prepared, split), prepared.manifest
    L, field, files = prepared.seq_len, m["config"]["messages_field"], [Path(f) for f in m["source_files"]]
    docs = sp.docs()
    wanted: dict[int, set[int]] = {}
    for _, _, fi, line in docs.tolist():
        wanted.setdefault(fi, set()).add(line)
    msgs = {fi: _records(files[fi], file_kind(files[fi]), lines, field) for fi, lines in wanted.items()}
    rows: list[list[ChatDoc]] = [[] for _ in range(len(sp))]
    for start, length, fi, line in docs.tolist():
        conv = [{"role": x["role"], "content": x["content"]} for x in msgs[fi][line]]
        rows[start // L].append(ChatDoc(start % L, length, conv))
    return rows


def chat_templates(teacher_dir: str | Path, student_dir: str | Path) -> tuple[str, str]:
    """(teacher's, student's) chat template text from the tokenizer folders. The student's is the one its prepared
    set was rendered with (a transplanted student without its own carries the teacher's, student.py); a teacher
    without one reads the student's."""
    from kd.data.encode import chat_template_of

    student = chat_template_of(student_dir)
    if student is None:
        raise DataError(f"{student_dir}: the student's tokenizer has no chat template, so chat data cannot be "
                        "rendered for it")
    return chat_template_of(teacher_dir) or student, student
