"""The cross-tokenizer settings: the loss (`CrossTokenizerLoss`) and the run's `kd.cross_tokenizer` part.

    from kd.cross_tokenizer.settings import CrossTokenizerConfig
    cfg.kd.cross_tokenizer.enabled          # teacher and student may have different tokenizers
    cfg.kd.cross_tokenizer.kind             # uld | hybrid | projection (kd/cross_tokenizer/losses.py)

Kept apart from losses.py so that kd/config.py can nest it without importing torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CrossTokenizerLoss(BaseModel):
    """The cross-tokenizer objective (kd/cross_tokenizer/losses.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    kind: Literal["uld", "hybrid", "projection"] = Field(
        "projection", description="uld: sorted L1 (Boizard et al. 2024); hybrid: divergence on byte-identical "
        "vocabulary entries + ULD on the rest (TRL GOLD); projection: student projected into the teacher's "
        "vocabulary by re-tokenization, forward KL over the teacher's top-k (X-Token, +3.8 points over GOLD).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="hybrid only: the divergence on matched entries (kd.train.losses conventions)")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD_beta's beta (hybrid with divergence=jsd)")
    matched_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="hybrid: weight of the matched part (the rest gets 1 - it); "
        "None = GOLD's adaptive share of matched teacher vocabulary")
    top_k: int = Field(64, ge=1, description="projection: teacher entries compared one by one (the rest is one bucket)")
    chunk_size: int = Field(32, ge=1, description="groups whose (g, V) distributions are computed at a time")
    token_chunk_size: int = Field(64, ge=1, description="tokens whose (n, V) logits are computed at a time for "
                                  "the realized-token log-probs (the chain rule's scalars and the CE)")
    end_of_turn: bool = Field(
        True, description="chat data: distil where each trained assistant turn ends, across templates: per turn end, "
        "the binary KL between the teacher's and the student's probability that the content ends there and their "
        "own end-of-turn markup begins (each side's first markup token, chain rule over the content bytes a "
        "straddling token carries), one more unit of the divergence's mean; with alpha > 0 the CE also trains "
        "those student tokens. false: the markup is left out as before (kd/cross_tokenizer/losses.py)")


class CrossTokenizerConfig(CrossTokenizerLoss):
    """`kd.cross_tokenizer`: distil across tokenizer families on byte-aligned groups (issue 30)."""

    enabled: bool = Field(
        False, description="Allow a teacher whose tokenizer differs from the student's: check_vocab gives the "
        "verdict `cross-tokenizer` (refused otherwise) and training compares the two on byte-aligned groups "
        "of tokens (TRL GOLD's rule) with the loss `kind`. Online teacher, off-policy only.")
    stats_blocks: int = Field(
        4, ge=1, le=256, description="Blocks of data.seq_len student tokens (from the first training records) "
        "on which check_vocab measures the alignment statistics and the teacher's mass on matched ids.")
