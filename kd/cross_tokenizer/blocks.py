"""Student token blocks -> the text each document piece spells -> byte-aligned groups with the teacher's tokens.

    segs = align_block(pair, ids_row, position_ids_row, special_ids)   # list[Segment], one per document piece
    seg.start, seg.stop        # student positions start..stop-1 of the block (the piece's tokens)
    seg.teacher_ids            # (m,) the teacher's tokenization of the text those tokens spell
    seg.student_bounds, seg.teacher_bounds   # (G+1,) group boundaries over the piece's tokens (align.py)
    rows = align_blocks(pair, ids, position_ids, special_ids)          # (B, L) -> list[list[Segment]], one
                                                                       # teacher batch-encode for all pieces
    plan = plan_batch(pair, ids, position_ids, labels, special_ids)   # BatchPlan: a batch's flat alignment
    plan = plan_batch(..., segments=stored.rows(batch_rows))          # from the prepared set's stored groups

Training and the vocab step see the student's *tokens* (the prepared set is tokenized by the student); the
teacher must see the same text. A block is cut into pieces at document starts (position ids restarting at 0)
and at special tokens (eos / bos / pad: their literal strings mean nothing to another family); each piece's
text is the concatenation of its tokens' bytes, so the student side round-trips by construction (its byte
ends are exact). Tokens at a piece's edges that carry only part of a UTF-8 character (a block cut through
an emoji) are left out of the piece. The teacher tokenizes the text (no special tokens added) and align.py
groups both sides. Training and eval read these segments from the prepared set's stored groups
(kd/cross_tokenizer/stored.py, built once at prepare time with align_blocks); aligning on the fly is what a batch
without stored groups gets (bare tensors, tests) and the check that stored == on the fly. Chat data are aligned
per conversation instead, each side in its own chat template (kd/cross_tokenizer/chat.py, stored the same way):
a Segment's `content` flags its groups of template markup, which no loss or eval compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kd.cross_tokenizer.align import TokenizerPair, group_bounds
from kd.cross_tokenizer.token_bytes import byte_ends


NO_TURN_ENDS = np.zeros((0, 4), dtype=np.int32)


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int
    teacher_ids: np.ndarray  # (m,) int64
    student_bounds: np.ndarray  # (G+1,) int32 over stop - start tokens
    teacher_bounds: np.ndarray  # (G+1,) int32 over m tokens
    teacher_round_trip: bool
    byte_bounds: np.ndarray  # (G+1,) int32 over the text's UTF-8 bytes
    content: np.ndarray | None = None  # (G,) bool: the group is compared (False: chat markup, chat.py); None: all
    end_of_turn: np.ndarray | None = None  # (E, 4) int32 per assistant turn end (chat.py): student tokens [a, b),
    #                                        teacher tokens [c, d) of the event "the content ends, the markup begins"


def pieces(ids: np.ndarray, position_ids: np.ndarray | None, special_ids: set[int]) -> list[tuple[int, int]]:
    """(L,) ids -> [(start, stop)]: maximal runs inside one document without special tokens."""
    out, start = [], None
    for k, i in enumerate(ids.tolist()):
        new_doc = position_ids is not None and k > 0 and int(position_ids[k]) == 0
        if start is not None and (new_doc or i in special_ids):
            out.append((start, k))
            start = None
        if start is None and i not in special_ids:
            start = k
    if start is not None:
        out.append((start, len(ids)))
    return out


def _valid_utf8_span(chunks: list[bytes]) -> tuple[int, int, str] | None:
    """Drop up to 3 tokens at each edge until the joined bytes decode; (first, stop, text) or None."""
    for a in range(min(4, len(chunks))):
        for b in range(len(chunks), max(a, len(chunks) - 4), -1):
            try:
                return a, b, b"".join(chunks[a:b]).decode("utf-8")
            except UnicodeDecodeError:
                continue
    return None


@dataclass(frozen=True)
class _Piece:
    start: int
    stop: int
    text: str
    student_ends: np.ndarray  # (stop - start,) byte end of each student token in text


def _student_pieces(pair: TokenizerPair, ids: np.ndarray, pos, special_ids: set[int]) -> list[_Piece]:
    """The student side: each document piece's tokens that spell whole UTF-8 characters, and their text."""
    out = []
    for p, q in pieces(ids, pos, special_ids):
        chunks = [pair.student_bytes.pieces[i] for i in ids[p:q].tolist()]
        span = _valid_utf8_span(chunks)
        if span is None:
            continue
        a, b, text = span
        chunks = chunks[a:b]
        if not text or any(len(c) == 0 for c in chunks):
            continue  # zero-width student tokens cannot be placed on bytes here
        s_ends = np.cumsum(np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks)))
        out.append(_Piece(p + a, p + b, text, s_ends))
    return out


def _segment(pair: TokenizerPair, piece: _Piece, teacher_enc) -> Segment | None:
    """The teacher side of a piece (teacher_enc: its (ids, offsets) from a batch encode) and the groups."""
    t = byte_ends(pair.teacher, pair.teacher_bytes, piece.text, ids=teacher_enc[0], offsets=teacher_enc[1])
    if len(t.ids) == 0:
        return None
    tb, sb, bb = group_bounds(t.ends, piece.student_ends)
    return Segment(piece.start, piece.stop, t.ids, sb, tb, t.round_trip, bb, np.ones(len(sb) - 1, dtype=bool),
                   NO_TURN_ENDS)


def align_blocks(pair: TokenizerPair, ids, position_ids, special_ids: set[int]) -> list[list[Segment]]:
    """(B, L) student ids (and position ids or None) -> each row's aligned pieces (module docstring); the teacher
    tokenizes every piece of the batch in one call."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = [_student_pieces(pair, ids[r], None if position_ids is None else np.asarray(position_ids[r]), special_ids)
            for r in range(ids.shape[0])]
    texts = [pc.text for row in rows for pc in row]
    enc = pair.teacher(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    out, k = [], 0
    for row in rows:
        segs = []
        for pc in row:
            seg = _segment(pair, pc, (enc["input_ids"][k], enc["offset_mapping"][k]))
            k += 1
            if seg is not None:
                segs.append(seg)
        out.append(segs)
    return out


def align_block(pair: TokenizerPair, ids, position_ids, special_ids: set[int]) -> list[Segment]:
    """One block row of student ids (L,) (and its position ids or None) -> its aligned pieces (docstring)."""
    return align_blocks(pair, np.asarray(ids)[None], None if position_ids is None else np.asarray(position_ids)[None],
                        special_ids)[0]


@dataclass(frozen=True)
class BatchPlan:
    """A batch of blocks aligned for a loss or an eval: each piece's first group dropped (the teacher sees only
    the piece, so nothing predicts its first tokens), every later group predicted from the position before its
    first token on each side. Flat over the batch (numpy):
    s_rows (Ns,) rows of the student's (B*L, H) hidden states predicting s_ids (Ns,); sb (G+1,) group bounds;
    t_seqs / t_pos: per block row, the teacher's tokens of its pieces packed, and their position ids (restarting
    per piece); t_rows (Nt,) rows of those packed sequences' concatenated hidden states predicting t_ids; tb (G+1,);
    keep (G,) bool: every student token of the group is trained (labels != -100) and the group is content (not chat
    markup, kd/cross_tokenizer/chat.py); group_bytes (G,) bytes per group;
    eot_s (E, 2), eot_t (E, 2): each trained assistant turn end (Segment.end_of_turn, chat.py) as [start, stop)
    into s_ids / t_ids: the tokens of the event "the content ends here and the end-of-turn markup begins" on each
    side; kept when all its student tokens are trained and something predicts it on both sides."""

    s_rows: np.ndarray
    s_ids: np.ndarray
    sb: np.ndarray
    t_seqs: list
    t_pos: list
    t_rows: np.ndarray
    t_ids: np.ndarray
    tb: np.ndarray
    keep: np.ndarray
    group_bytes: np.ndarray
    eot_s: np.ndarray
    eot_t: np.ndarray


def plan_batch(pair: TokenizerPair, ids, position_ids, labels, special_ids: set[int], ignore: int = -100, *,
               segments: list[list[Segment]] | None = None) -> BatchPlan:
    """(B, L) student ids, position ids (or None), (B, L-1) labels -> the BatchPlan (its docstring). `segments`:
    each row's aligned pieces when stored (kd/cross_tokenizer/stored.py); None: aligned here (align_blocks)."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    pos = None if position_ids is None else np.asarray(position_ids)
    B, L = ids.shape
    if segments is None:
        segments = align_blocks(pair, ids, pos, special_ids)
    s_rows, s_ids, s_bounds, keep, g_bytes = [], [], [0], [], []
    t_seqs, t_pos, t_rows, t_ids, t_bounds = [], [], [], [], [0]
    eot_s, eot_t = [], []
    t_base = 0
    for r in range(B):
        row_ids, row_pos, row_len = [], [], 0
        for seg in segments[r]:
            sb, tb = seg.student_bounds.astype(np.int64), seg.teacher_bounds.astype(np.int64)
            offset_t = row_len
            row_ids.append(seg.teacher_ids)
            row_pos.append(np.arange(len(seg.teacher_ids)))
            row_len += len(seg.teacher_ids)
            if len(sb) < 3:  # one group: nothing predicted on both sides
                continue
            s_pred = np.arange(seg.start + sb[1], seg.stop)  # student positions predicted
            s_rows.append(r * L + s_pred - 1)
            s_ids.append(ids[r, s_pred])
            trained = labels[r, s_pred - 1] != ignore
            kept = np.logical_and.reduceat(trained, sb[1:-1] - sb[1])
            keep.append(kept if seg.content is None else kept & seg.content[1:])
            s_bounds.extend((s_bounds[-1] + np.cumsum(np.diff(sb[1:]))).tolist())
            t_pred = np.arange(tb[1], len(seg.teacher_ids))
            t_rows.append(t_base + offset_t + t_pred - 1)
            t_ids.append(seg.teacher_ids[t_pred])
            t_bounds.extend((t_bounds[-1] + np.cumsum(np.diff(tb[1:]))).tolist())
            g_bytes.append(np.diff(seg.byte_bounds.astype(np.int64))[1:])
            s_flat, t_flat = s_bounds[-1] - (seg.stop - seg.start), t_bounds[-1] - len(seg.teacher_ids)
            for a, b, c, d in (NO_TURN_ENDS if seg.end_of_turn is None else seg.end_of_turn).tolist():
                if a >= sb[1] and c >= tb[1] and (labels[r, seg.start + a - 1 : seg.start + b - 1] != ignore).all():
                    eot_s.append((s_flat + a, s_flat + b))
                    eot_t.append((t_flat + c, t_flat + d))
        t_seqs.append(np.concatenate(row_ids) if row_ids else np.zeros(0, dtype=np.int64))
        t_pos.append(np.concatenate(row_pos) if row_pos else np.zeros(0, dtype=np.int64))
        t_base += row_len

    def cat(parts, dtype=np.int64):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    pairs = lambda x: np.asarray(x, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    return BatchPlan(cat(s_rows), cat(s_ids), np.asarray(s_bounds, dtype=np.int64), t_seqs, t_pos, cat(t_rows),
                     cat(t_ids), np.asarray(t_bounds, dtype=np.int64), cat(keep, bool), cat(g_bytes), pairs(eot_s),
                     pairs(eot_t))
