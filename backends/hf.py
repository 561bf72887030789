"""transformers causal LMs (the real backend): safetensors only, remote code off by default.

Loading is strict: a checkpoint whose weights do not match the architecture exactly (a missing
weight would be left randomly initialised, an unexpected one silently ignored, a mismatched shape
re-initialised) is refused with a ModelError naming the keys. transformers itself only logs them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd.errors import ModelError
from kd.model_build_lock import MODEL_BUILD_LOCK

SHOW_KEYS = 8  # keys named in an error message


def _names(keys) -> str:
    keys = sorted(str(k) for k in keys)
    more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return ", ".join(keys[:SHOW_KEYS]) + more


def check_loading_info(where, info: dict, tied: set[str] = frozenset()) -> None:
    """ModelError unless every weight was found and used: nothing missing, unexpected or mismatched.

    `tied`: parameter names that alias another weight (a tied output head), which a checkpoint
    rightly does not store.
    """
    missing = set(info.get("missing_keys") or ()) - set(tied)
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weight(s) (would be random): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s) (would be ignored): {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) with the wrong shape: {_names(mismatched)}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(e) for e in info["error_msgs"])[:500])
    if problems:
        raise ModelError(f"{where}: the weights do not match the model's architecture: " + "; ".join(problems))


def _tied_names(model) -> set[str]:
    """Parameter names that share storage with an earlier one (e.g. lm_head.weight tied to the embeddings)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def _shape_mismatches(d: Path, trust_remote_code: bool) -> str:
    """'name: checkpoint [a, b] vs model [c, d]' for every stored weight whose shape the config contradicts."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with MODEL_BUILD_LOCK, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code),
                                                     trust_remote_code=trust_remote_code)
        want = {k: list(v.shape) for k, v in model.state_dict().items()}
        bad = []
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    got = list(st.get_slice(k).get_shape())
                    if k in want and want[k] != got:
                        bad.append(f"{k}: checkpoint {got} vs model {want[k]}")
    except Exception:  # best effort: the caller still reports transformers' own message
        return ""
    return f"{len(bad)} weight(s) with the wrong shape: " + ", ".join(bad[:SHOW_KEYS]) if bad else ""


class HFBackend:
    def load(self, model_dir, *, device="cpu", dtype=torch.float32, trust_remote_code=False):
        """`dtype=None` keeps the dtype the weights are stored in."""
        d = Path(model_dir)
        if not any(d.glob("*.safetensors")):
            raise ModelError(f"{d}: no *.safetensors weights (pickle .bin/.pt weights are refused)")
        with MODEL_BUILD_LOCK:  # a sweep's trials load in threads of one process: see kd.model_build_lock
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # per-tensor loading bars drown the training log
            try:
                model, info = AutoModelForCausalLM.from_pretrained(
                    d, dtype=dtype if dtype is not None else "auto", trust_remote_code=trust_remote_code,
                    use_safetensors=True, output_loading_info=True,
                )
            except RuntimeError as err:  # transformers 5 raises on a shape mismatch without naming the weight
                raise ModelError(f"{d}: the weights do not match the model's architecture: "
                                 f"{_shape_mismatches(d, trust_remote_code) or err}") from err
            except (OSError, ValueError, KeyError) as err:
                raise ModelError(f"{d}: cannot load as a causal LM: {err}") from err
        check_loading_info(d, info, _tied_names(model))
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
