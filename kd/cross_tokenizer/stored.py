"""The prepared set's byte-aligned groups, stored once beside it (issue 30 item 2): memory-mapped, like the blocks.

    folder = ensure_groups(prepared_root, pair, teacher_dir, student_dir)   # built once (build_once), at prepare
    groups = stored_groups(prepared_root, pair, teacher_dir, student_dir)   # {"train": StoredGroups, "heldout": ..}
    segs = groups["train"].rows(batch_rows)      # list[list[Segment]], what align_blocks gives for those rows
    plan = plan_batch(pair, ids, pos, labels, specials, segments=segs)

The prepared set is tokenized by the student; the teacher's tokens and the groups depend on the teacher's tokenizer
too. So they live in `<prepared>/groups/<key>/<split>/`, key = sha256 of the prepared set's content hash, both
tokenizers' files and this code (kd/cross_tokenizer/): another teacher tokenizer, another folder; the prepared
set itself is shared. What each block row stores is exactly kd/cross_tokenizer/blocks.py's align_blocks output
(its pieces, each with the teacher's ids and the group boundaries), flat in .npy files read with mmap:

    block_segments (B+1,) int64    row b's pieces are b_s[b]:b_s[b+1]
    segment_span (S, 2) int32      each piece's student positions start, stop within its row
    segment_round_trip (S,) bool   the teacher's tokens spell the piece's text
    segment_tokens (S+1,) int64    teacher_ids (T,) int32 of piece s: segment_tokens[s]:segment_tokens[s+1]
    segment_groups (S+1,) int64    piece s's groups in the three *_end arrays (G,) int32: each group's end
                                   (exclusive) in the piece's teacher tokens, student tokens, and bytes, and in
    group_content (G,) bool        the group is compared (False: chat template markup)
    segment_turn_ends (S+1,) int64 piece s's assistant turn ends (chat.py) are rows [t[s], t[s+1]) of
    turn_end (E, 4) int32          student tokens [a, b), teacher tokens [c, d) of each turn end, in the piece

Chat data (the prepared set's format `chat`) are stored per conversation, each side rendered by its own chat
template (kd/cross_tokenizer/chat.py's align_chat_blocks; the conversations read back from the source records):
a piece is then a whole conversation, its teacher ids the teacher template's rendering.

groups.json (written last: the build_once marker) holds the key's inputs, counts and the build's seconds.
tests/test_cross_tokenizer_stored.py holds stored == on the fly for a real pair.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from kd.build_once import build_once
from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.blocks import NO_TURN_ENDS, Segment, align_blocks
from kd.cross_tokenizer.chat import align_chat_blocks, chat_docs, chat_templates
from kd.cross_tokenizer.report import special_ids
from kd.data.prepared import SPLITS, open_prepared
from kd.data.sources import tokenizer_fingerprint
from kd.hashing import digest_of, package_hash

MARKER = "groups.json"
GROUP_FORMAT = 3  # bump when the layout changes
ROWS_PER_CALL = 64  # block rows aligned per teacher batch-encode
FILES = ("block_segments", "segment_span", "segment_round_trip", "segment_tokens", "teacher_ids", "segment_groups",
         "teacher_group_end", "student_group_end", "group_byte_end", "group_content", "segment_turn_ends", "turn_end")


def groups_key(prepared_root: str | Path, teacher_dir: str | Path, student_dir: str | Path) -> dict:
    """What the stored groups depend on (the folder name is its digest)."""
    return {"format": GROUP_FORMAT, "prepared": open_prepared(prepared_root).content_hash,
            "teacher_tokenizer": tokenizer_fingerprint(teacher_dir), "student_tokenizer": tokenizer_fingerprint(student_dir),
            "code": package_hash(Path(__file__).resolve().parent)}


def groups_folder(prepared_root: str | Path, key: dict) -> Path:
    return Path(prepared_root) / "groups" / digest_of(key)[:16]


def _build_split(pair: TokenizerPair, split, specials: set[int], out: Path, chat=None) -> dict:
    """Align every block row of `split` and write the FILES into `out`; counts. chat: (each row's ChatDocs,
    (teacher, student) templates) for chat data."""
    parts: dict[str, list] = {n: [] for n in FILES}
    n_seg = n_tok = n_grp = n_end = 0
    offsets = {"block_segments": [0], "segment_tokens": [0], "segment_groups": [0], "segment_turn_ends": [0]}
    for start in range(0, len(split), ROWS_PER_CALL):
        b = split.batch(range(start, min(start + ROWS_PER_CALL, len(split))))
        rows = (align_blocks(pair, b.ids.numpy(), b.position_ids.numpy(), specials) if chat is None else
                align_chat_blocks(pair, b.ids.numpy(), b.position_ids.numpy(), [chat[0][int(r)] for r in b.rows],
                                  specials, chat[1]))
        for segs in rows:
            for seg in segs:
                parts["segment_span"].append((seg.start, seg.stop))
                parts["segment_round_trip"].append(seg.teacher_round_trip)
                parts["teacher_ids"].append(seg.teacher_ids.astype(np.int32))
                parts["teacher_group_end"].append(seg.teacher_bounds[1:])
                parts["student_group_end"].append(seg.student_bounds[1:])
                parts["group_byte_end"].append(seg.byte_bounds[1:])
                parts["group_content"].append(np.ones(len(seg.byte_bounds) - 1, bool) if seg.content is None
                                              else seg.content)
                ends = NO_TURN_ENDS if seg.end_of_turn is None else seg.end_of_turn
                parts["turn_end"].append(ends)
                n_tok += len(seg.teacher_ids)
                n_grp += len(seg.student_bounds) - 1
                n_end += len(ends)
                offsets["segment_turn_ends"].append(n_end)
                offsets["segment_tokens"].append(n_tok)
                offsets["segment_groups"].append(n_grp)
            n_seg += len(segs)
            offsets["block_segments"].append(n_seg)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {n: np.asarray(v, dtype=np.int64) for n, v in offsets.items()}
    arrays["segment_span"] = np.asarray(parts["segment_span"], dtype=np.int32).reshape(-1, 2)
    arrays["segment_round_trip"] = np.asarray(parts["segment_round_trip"], dtype=bool)
    arrays["group_content"] = np.concatenate(parts["group_content"]) if parts["group_content"] else np.zeros(0, bool)
    arrays["turn_end"] = np.concatenate([NO_TURN_ENDS, *parts["turn_end"]]).astype(np.int32)
    for n in ("teacher_ids", "teacher_group_end", "student_group_end", "group_byte_end"):
        arrays[n] = np.concatenate(parts[n]).astype(np.int32) if parts[n] else np.zeros(0, np.int32)
    for n in FILES:
        np.save(out / f"{n}.npy", arrays[n])
    return {"blocks": len(split), "segments": n_seg, "teacher_tokens": n_tok, "groups": n_grp, "turn_ends": n_end}


def ensure_groups(prepared_root: str | Path, pair: TokenizerPair, teacher_dir: str | Path,
                  student_dir: str | Path) -> Path:
    """The stored groups' folder for this prepared set and tokenizer pair, built here if missing."""
    key = groups_key(prepared_root, teacher_dir, student_dir)
    out = groups_folder(prepared_root, key)

    def build(tmp: Path) -> None:
        ps, specials, t0 = open_prepared(prepared_root), special_ids(pair.student), time.perf_counter()
        templates = chat_templates(teacher_dir, student_dir) if ps.manifest["format"] == "chat" else None
        counts = {name: _build_split(pair, getattr(ps, name), specials, tmp / name,
                                     None if templates is None else (chat_docs(ps, name), templates))
                  for name in SPLITS}
        (tmp / MARKER).write_text(json.dumps({"key": key, "splits": counts, "build_s": time.perf_counter() - t0},
                                             indent=1))

    build_once(out, MARKER, build)
    return out


class StoredGroups:
    """One split's stored groups, memory-mapped: `rows(rows)` rebuilds those block rows' Segments."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for n in FILES:
            setattr(self, n, np.load(self.folder / f"{n}.npy", mmap_mode="r"))

    def __len__(self) -> int:
        return len(self.block_segments) - 1

    def segment(self, s: int) -> Segment:
        a, b = int(self.segment_tokens[s]), int(self.segment_tokens[s + 1])
        g0, g1 = int(self.segment_groups[s]), int(self.segment_groups[s + 1])
        z = np.zeros(1, dtype=np.int32)

        def bounds(name: str) -> np.ndarray:
            return np.concatenate([z, getattr(self, name)[g0:g1]])

        start, stop = (int(x) for x in self.segment_span[s])
        e0, e1 = int(self.segment_turn_ends[s]), int(self.segment_turn_ends[s + 1])
        return Segment(start, stop, np.asarray(self.teacher_ids[a:b], dtype=np.int64), bounds("student_group_end"),
                       bounds("teacher_group_end"), bool(self.segment_round_trip[s]), bounds("group_byte_end"),
                       np.asarray(self.group_content[g0:g1], dtype=bool), np.asarray(self.turn_end[e0:e1], np.int32))

    def rows(self, rows) -> list[list[Segment]]:
        return [[self.segment(s) for s in range(int(self.block_segments[r]), int(self.block_segments[r + 1]))]
                for r in np.asarray(rows, dtype=np.int64).tolist()]


def stored_groups(prepared_root: str | Path, pair: TokenizerPair, teacher_dir: str | Path,
                  student_dir: str | Path) -> dict[str, StoredGroups]:
    """{split: StoredGroups} for this prepared set and tokenizer pair (built first if missing: a set prepared
    before, or by a step that did not know the teacher)."""
    out = ensure_groups(prepared_root, pair, teacher_dir, student_dir)
    return {name: StoredGroups(out / name) for name in SPLITS}


def stored_rows(groups: dict, batch) -> list[list[Segment]] | None:
    """A batch's rows' Segments from `groups` ({split: StoredGroups}) when the batch names its split and rows
    (kd.data.Batch from a Split); None: the caller aligns on the fly."""
    split, rows = getattr(batch, "split", None), getattr(batch, "rows", None)
    return None if rows is None or split not in groups else groups[split].rows(rows)
