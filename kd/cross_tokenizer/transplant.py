"""Give a donor causal LM a new tokenizer: a student that speaks another family's tokens (tokensurgeon-like).

    from kd.cross_tokenizer.transplant import transplant_tokenizer
    report = transplant_tokenizer(model, donor_tok, new_tok)   # in place: embeddings (and head) resized
    report.kept, report.composed, report.unmapped              # how each new row was made

Issue 30 item 4: a (pruned) SmolLM2 can become a student on the GPT-2 or Qwen2 tokenizer. Each row of the new
vocabulary is built from the donor's rows:
- a new token standing for exactly the bytes of a donor token (vocab_map.exact_matches: byte-level "Ġthe" =
  SentencePiece "▁the" = b" the") keeps that donor row, in the input embedding and in the output head;
- any other new token is the mean of the donor rows of its bytes' donor tokenization (the donor tokenizer
  re-tokenizes its string, or a greedy longest-prefix byte match for a piece of a multi-byte character;
  this is vocab_map.build_projection with equal weights);
- a token with no donor bytes at all (an empty piece) gets the mean of all donor rows.
This is the simple "mean of the pieces" initialization (as in FOCUS/WECHSEL's fallback, and mergekit's
tokensurgeon `--approximation-method mean`); tokensurgeon's default, orthogonal matching pursuit over the
embeddings of shared tokens, is not taken: it needs a search per token (minutes for 50k tokens on 2 cores)
and the mean already keeps every shared row exactly, which is what distillation then refines.
The config's vocab_size and special-token ids are set from the new tokenizer. Tied embeddings stay tied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd.cross_tokenizer.align import TokenizerPair
from kd.cross_tokenizer.vocab_map import build_projection
from kd.model_build_lock import MODEL_BUILD_LOCK


@dataclass(frozen=True)
class TransplantReport:
    """Rows of the new vocabulary: kept (a donor row as is), composed (mean of donor rows), unmapped (mean of all)."""

    new_vocab: int
    donor_vocab: int
    kept: int
    composed: int
    unmapped: int


def _compose(donor_rows: torch.Tensor, proj_t: torch.Tensor, has_row: torch.Tensor) -> torch.Tensor:
    """(Vd, H) donor rows, (Vd, Vn) sparse weights transposed -> (Vn, H) new rows (mean of all where no row)."""
    w = donor_rows.detach().to(torch.float32)
    new = torch.sparse.mm(proj_t.t().coalesce(), w)  # (Vn, Vd) @ (Vd, H)
    new[~has_row] = w.mean(0)
    return new.to(donor_rows.dtype)


@torch.no_grad()
def transplant_tokenizer(model, donor_tok, new_tok, *, max_pieces: int = 64) -> TransplantReport:
    """Resize `model` (a transformers causal LM using donor_tok) to new_tok's vocabulary, in place (docstring above)."""
    pair = TokenizerPair.of(donor_tok, new_tok)  # "teacher" = donor, "student" = the new tokenizer
    proj = build_projection(pair, max_tokens=max_pieces, decay=1.0)  # decay 1: equal weights = the mean
    v_new, v_donor = proj.student_size, proj.teacher_size
    proj_t = proj.matrix_t(torch.float32)  # (Vd, Vn)
    has_row = torch.zeros(v_new, dtype=torch.bool)
    has_row[torch.as_tensor(proj.indices[0])] = True
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = _compose(emb.weight[:v_donor], proj_t, has_row)
    new_head = None if head is None or tied else _compose(head.weight[:v_donor], proj_t, has_row)
    with MODEL_BUILD_LOCK:  # resizing builds new embedding modules (transformers' process-wide init state)
        model.resize_token_embeddings(v_new)
    model.get_input_embeddings().weight.copy_(new_emb)
    if new_head is not None:
        model.get_output_embeddings().weight.copy_(new_head)
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.zero_()
    model.config.vocab_size = v_new
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(new_tok, name, None))
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, getattr(new_tok, name, None))
    return TransplantReport(new_vocab=v_new, donor_vocab=v_donor, kept=proj.how["exact"],
                            composed=proj.how["retokenized"] + proj.how["greedy"], unmapped=proj.how["none"])
