"""The protocol every model backend implements, and the registry that picks one by name.

The KD loss and eval never ask a model for logits: they take the final hidden states and the
output matrix and compute logits chunk by chunk (vocab is ~152k for Qwen2.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class CausalLMBackend(Protocol):
    def load(
        self, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> torch.nn.Module:
        """Load a causal LM from a local folder (safetensors only)."""

    def hidden_states(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states `(B, T, H)`, i.e. the input of the output layer. Position ids that restart
        mark packed documents: attention must then stay within each document."""

    def output_head(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output matrix `(V, H)` and optional bias `(V,)`: logits = hidden @ W.T + b."""


BACKENDS: dict[str, CausalLMBackend] = {}


def get_backend(name: str = "hf") -> CausalLMBackend:
    if not BACKENDS:
        from backends.hf import HFBackend

        BACKENDS["hf"] = HFBackend()
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from None
