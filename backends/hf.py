"""transformers causal LMs (the real backend): safetensors only, remote code off by default."""

from __future__ import annotations

from pathlib import Path

import torch

from kd.errors import ModelError


class HFBackend:
    def load(self, model_dir, *, device="cpu", dtype=torch.float32, trust_remote_code=False):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor loading bars drown the training log

        d = Path(model_dir)
        if not any(d.glob("*.safetensors")):
            raise ModelError(f"{d}: no *.safetensors weights (pickle .bin/.pt weights are refused)")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                d, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{d}: cannot load as a causal LM: {err}") from err
        return model.to(device)

    def hidden_states(self, model, input_ids, attention_mask=None, position_ids=None):
        # position ids that restart per packed document (and no attention_mask) give block-diagonal
        # causal attention in transformers >= 4.54 (masking_utils.find_packed_sequence_indices), but
        # only without a KV cache: use_cache=True silently falls back to one causal mask over the block
        return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state

    def output_head(self, model):
        head = model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)
