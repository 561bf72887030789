"""What check_vocab reports for a cross-tokenizer pair: alignment statistics on a sample of the training text.

    stats = alignment_report(teacher_dir, student_dir, blocks, teacher_model=model)   # a JSON-able dict

`blocks` (B, L) are student token blocks (kd.data.sample_blocks: the first training records). Their text
is recovered per document piece (blocks.py) and aligned with the teacher's tokenization (align.py):
- one_to_one_share, mean_teacher_group, mean_student_group, teacher/student_not_round_trip, bytes_not_round_trip
  (AlignmentStats over the pieces);
- exact_match: vocabulary pairs with the same bytes (vocab_map.exact_matches) and their share of each side;
- teacher_matched_mass_mean: the teacher's mean probability, over its predictions on the sample, on ids that
  have an exact student match (where it is low the hybrid loss leans on ULD), when a teacher model is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kd.cross_tokenizer.align import AlignmentStats, DocAlignment, TokenizerPair
from kd.cross_tokenizer.blocks import align_block
from kd.cross_tokenizer.token_bytes import TokenSpans
from kd.cross_tokenizer.vocab_map import exact_matches, matched_mass
from kd.train.losses import iter_logit_chunks


def load_pair(teacher_dir: str | Path, student_dir: str | Path) -> TokenizerPair:
    """The two model folders' fast tokenizers and byte tables."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(teacher_dir))
    s = AutoTokenizer.from_pretrained(str(student_dir))
    return TokenizerPair.of(t, s)


def special_ids(tok) -> set[int]:
    """eos / bos / pad (and the tokenizer's other special ids): where blocks are cut into pieces."""
    return {int(i) for i in tok.all_special_ids if i is not None}


@torch.no_grad()
def alignment_report(pair: TokenizerPair, blocks: torch.Tensor, *, teacher_model=None,
                     max_teacher_tokens: int = 4096) -> dict:
    """The statistics named in the module docstring, over the pieces of `blocks` (B, L)."""
    stats = AlignmentStats()
    teacher_docs: list[np.ndarray] = []
    specials = special_ids(pair.student)
    for row in blocks.cpu().numpy():
        for seg in align_block(pair, row, None, specials):
            n = seg.stop - seg.start
            s_spans = TokenSpans(row[seg.start:seg.stop].astype(np.int64), np.zeros(n, dtype=np.int64), True)
            t_spans = TokenSpans(seg.teacher_ids, np.zeros(len(seg.teacher_ids), dtype=np.int64),
                                 seg.teacher_round_trip)
            stats.add(DocAlignment(t_spans, s_spans, seg.teacher_bounds, seg.student_bounds, seg.byte_bounds))
            teacher_docs.append(seg.teacher_ids)
    vmap = exact_matches(pair.teacher_bytes, pair.student_bytes)
    out = {**stats.as_dict(), "exact_match": vmap.as_dict(), "teacher_matched_mass_mean": None,
           "teacher_tokens_scored": 0}
    if teacher_model is not None and teacher_docs:
        from backends import get_backend

        be = get_backend("hf")
        weight, bias = be.output_head(teacher_model)
        rows = len(pair.teacher_bytes)
        masses, scored = [], 0
        for ids in teacher_docs:
            if scored >= max_teacher_tokens or len(ids) < 2:
                continue
            x = torch.as_tensor(ids[: max_teacher_tokens - scored + 1], device=weight.device).unsqueeze(0)
            h = be.hidden_states(teacher_model, x)[0, :-1]
            b = None if bias is None else bias[:rows]
            for _, logits in iter_logit_chunks(h, weight[:rows], b, chunk_size=256):  # never (n, V) at once
                masses.append(matched_mass(torch.log_softmax(logits, -1), vmap))
            scored += h.shape[0]
        if masses:
            out["teacher_matched_mass_mean"] = float(torch.cat(masses).mean())
            out["teacher_tokens_scored"] = scored
    return out
