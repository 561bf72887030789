"""Byte-aligned groups of teacher and student tokens over the same text, their storage and statistics.

    pair = TokenizerPair.of(teacher_tok, student_tok)
    doc = align_text(pair, "Hello 😀 world")      # DocAlignment: ids, spans and group boundaries per side
    doc.teacher_bounds, doc.student_bounds       # (G+1,) int32: group g is tokens bounds[g]:bounds[g+1]
    doc.byte_bounds                              # (G+1,) int32: both sides' group g spans these bytes
    aligned = align_texts(pair, texts)           # AlignedSet: flat int32/int64 arrays + AlignmentStats
    aligned.save(folder); AlignedSet.load(folder, mmap=True)

The rule is TRL GOLD's (`GOLDTrainer._align_by_byte_offsets`, since PR #5885): both tokenizers tokenize the
same text, every token carries its UTF-8 byte span (kd/cross_tokenizer/token_bytes.py), and a group closes
at every byte position where a token ends on both sides. GOLD walks two pointers; here the closing points
are the intersection of the two sides' end positions, and each side's boundaries are a searchsorted over
it (vectorised, same groups). Properties the tests hold: the groups partition both token sequences in
order, every group has at least one token per side, and group g covers the same bytes on both sides.
Zero-width tokens (a SentencePiece phantom space) join the group their end position falls in.

Stats (what `check_vocab` will report, issue 30 item 1): the share of one-to-one groups (one token each
side: there the loss is the ordinary per-token one), the mean group size per side, and how many texts did
not round-trip on each side (their spans came from character offsets; see token_bytes.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kd.cross_tokenizer.token_bytes import TokenBytes, TokenSpans, byte_ends, token_bytes


@dataclass(frozen=True)
class TokenizerPair:
    """The two fast tokenizers and their byte tables (token_bytes), built once per pair."""

    teacher: object
    student: object
    teacher_bytes: TokenBytes
    student_bytes: TokenBytes

    @classmethod
    def of(cls, teacher_tok, student_tok) -> TokenizerPair:
        return cls(teacher_tok, student_tok, token_bytes(teacher_tok), token_bytes(student_tok))


@dataclass(frozen=True)
class DocAlignment:
    teacher: TokenSpans
    student: TokenSpans
    teacher_bounds: np.ndarray  # (G+1,) int32, 0 .. n_teacher_tokens
    student_bounds: np.ndarray  # (G+1,) int32, 0 .. n_student_tokens
    byte_bounds: np.ndarray  # (G+1,) int32, 0 .. len(text.encode())

    @property
    def groups(self) -> int:
        return len(self.byte_bounds) - 1


def group_bounds(teacher_ends: np.ndarray, student_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two sides' token byte ends (non-decreasing, same last value) -> (teacher, student, byte) boundaries.

    A group closes at each byte position > 0 where both sides have a token ending (GOLD's rule)."""
    t, s = np.asarray(teacher_ends, dtype=np.int64), np.asarray(student_ends, dtype=np.int64)
    t_total = int(t[-1]) if len(t) else 0
    s_total = int(s[-1]) if len(s) else 0
    if t_total != s_total:
        raise ValueError(f"the two sides cover different byte lengths: teacher {t_total}, student {s_total}")
    closes = np.intersect1d(t[t > 0], s[s > 0])  # sorted, unique; includes the total when > 0
    zero = np.zeros(1, dtype=np.int64)
    tb = np.concatenate([zero, np.searchsorted(t, closes, side="right")])
    sb = np.concatenate([zero, np.searchsorted(s, closes, side="right")])
    if len(closes):  # tokens ending at 0 (zero-width at the start) were counted into group 0 already
        tb[-1], sb[-1] = len(t), len(s)
    return tb.astype(np.int32), sb.astype(np.int32), np.concatenate([zero, closes]).astype(np.int32)


def align_text(pair: TokenizerPair, text: str, *, teacher_enc=None, student_enc=None) -> DocAlignment:
    """Tokenize `text` with both tokenizers (no special tokens added) and group the tokens by bytes.

    teacher_enc / student_enc: (ids, offsets) when the caller already encoded the text."""
    t = byte_ends(pair.teacher, pair.teacher_bytes, text,
                  **({} if teacher_enc is None else {"ids": teacher_enc[0], "offsets": teacher_enc[1]}))
    s = byte_ends(pair.student, pair.student_bytes, text,
                  **({} if student_enc is None else {"ids": student_enc[0], "offsets": student_enc[1]}))
    tb, sb, bb = group_bounds(t.ends, s.ends)
    return DocAlignment(t, s, tb, sb, bb)


@dataclass
class AlignmentStats:
    """Counts over a set of documents; shares and means are derived (JSON via as_dict)."""

    documents: int = 0
    groups: int = 0
    teacher_tokens: int = 0
    student_tokens: int = 0
    one_to_one_groups: int = 0
    text_bytes: int = 0
    teacher_not_round_trip: int = 0  # documents whose teacher tokens do not spell the text
    student_not_round_trip: int = 0
    bytes_not_round_trip: int = 0  # bytes of the documents that did not round-trip on either side

    def add(self, doc: DocAlignment) -> None:
        t_sizes, s_sizes = np.diff(doc.teacher_bounds), np.diff(doc.student_bounds)
        self.documents += 1
        self.groups += doc.groups
        self.teacher_tokens += int(doc.teacher_bounds[-1])
        self.student_tokens += int(doc.student_bounds[-1])
        self.one_to_one_groups += int(((t_sizes == 1) & (s_sizes == 1)).sum())
        n_bytes = int(doc.byte_bounds[-1])
        self.text_bytes += n_bytes
        self.teacher_not_round_trip += int(not doc.teacher.round_trip)
        self.student_not_round_trip += int(not doc.student.round_trip)
        if not (doc.teacher.round_trip and doc.student.round_trip):
            self.bytes_not_round_trip += n_bytes

    def as_dict(self) -> dict:
        g = max(self.groups, 1)
        return {**asdict(self), "one_to_one_share": self.one_to_one_groups / g,
                "mean_teacher_group": self.teacher_tokens / g, "mean_student_group": self.student_tokens / g}


ARRAYS = ("teacher_ids", "student_ids", "teacher_token_offsets", "student_token_offsets",
          "teacher_group_end", "student_group_end", "group_byte_end", "doc_group_offsets")


@dataclass
class AlignedSet:
    """Many documents' alignments as flat arrays (memory-mappable .npy files, like the prepared set).

    Document d has groups doc_group_offsets[d]:doc_group_offsets[d+1]; for each group, *_group_end is the
    token index (within the document) one past its last token on that side, and group_byte_end the byte
    one past it. A group starts where the previous one in its document ended (0 for the first).
    teacher_ids / student_ids are each side's tokens, document d at *_token_offsets[d]:*_token_offsets[d+1]."""

    teacher_ids: np.ndarray  # int32
    student_ids: np.ndarray  # int32
    teacher_token_offsets: np.ndarray  # (D+1,) int64
    student_token_offsets: np.ndarray  # (D+1,) int64
    teacher_group_end: np.ndarray  # (sum G,) int32
    student_group_end: np.ndarray  # (sum G,) int32
    group_byte_end: np.ndarray  # (sum G,) int32
    doc_group_offsets: np.ndarray  # (D+1,) int64
    stats: AlignmentStats

    def __len__(self) -> int:
        return len(self.doc_group_offsets) - 1

    def bounds(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document d's (teacher, student, byte) boundaries, (G+1,) int32 each, as align_text gives them."""
        a, b = int(self.doc_group_offsets[d]), int(self.doc_group_offsets[d + 1])
        z = np.zeros(1, dtype=np.int32)
        return (np.concatenate([z, self.teacher_group_end[a:b]]), np.concatenate([z, self.student_group_end[a:b]]),
                np.concatenate([z, self.group_byte_end[a:b]]))

    def ids(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        t, s = self.teacher_token_offsets, self.student_token_offsets
        return self.teacher_ids[t[d]:t[d + 1]], self.student_ids[s[d]:s[d + 1]]

    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(out / f"{name}.npy", getattr(self, name))
        (out / "alignment-stats.json").write_text(json.dumps(self.stats.as_dict(), indent=1))
        return out

    @classmethod
    def load(cls, folder: str | Path, *, mmap: bool = True) -> AlignedSet:
        d = Path(folder)
        arrays = {n: np.load(d / f"{n}.npy", mmap_mode="r" if mmap else None) for n in ARRAYS}
        raw = json.loads((d / "alignment-stats.json").read_text())
        stats = AlignmentStats(**{k: raw[k] for k in AlignmentStats.__dataclass_fields__})
        return cls(**arrays, stats=stats)


def align_texts(pair: TokenizerPair, texts: list[str]) -> AlignedSet:
    """Align every text (batch-encoded on both sides) into one AlignedSet with its stats."""
    kw = {"add_special_tokens": False, "return_offsets_mapping": True}
    t_enc, s_enc = pair.teacher(list(texts), **kw), pair.student(list(texts), **kw)
    stats = AlignmentStats()
    parts: dict[str, list[np.ndarray]] = {n: [] for n in ARRAYS}
    t_off, s_off, g_off = [0], [0], [0]
    for k, text in enumerate(texts):
        doc = align_text(pair, text, teacher_enc=(t_enc["input_ids"][k], t_enc["offset_mapping"][k]),
                         student_enc=(s_enc["input_ids"][k], s_enc["offset_mapping"][k]))
        stats.add(doc)
        parts["teacher_ids"].append(doc.teacher.ids.astype(np.int32))
        parts["student_ids"].append(doc.student.ids.astype(np.int32))
        parts["teacher_group_end"].append(doc.teacher_bounds[1:])
        parts["student_group_end"].append(doc.student_bounds[1:])
        parts["group_byte_end"].append(doc.byte_bounds[1:])
        t_off.append(t_off[-1] + len(doc.teacher.ids))
        s_off.append(s_off[-1] + len(doc.student.ids))
        g_off.append(g_off[-1] + doc.groups)

    def cat(name: str) -> np.ndarray:
        return np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=np.int32)

    return AlignedSet(
        teacher_ids=cat("teacher_ids"), student_ids=cat("student_ids"),
        teacher_token_offsets=np.asarray(t_off, dtype=np.int64), student_token_offsets=np.asarray(s_off, dtype=np.int64),
        teacher_group_end=cat("teacher_group_end"), student_group_end=cat("student_group_end"),
        group_byte_end=cat("group_byte_end"), doc_group_offsets=np.asarray(g_off, dtype=np.int64), stats=stats,
    )
