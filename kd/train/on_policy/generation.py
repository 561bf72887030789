"""Where completions come from: the `Generator` seam and its transformers backend.

    gen = get_generator("transformers", stop_ids={2}, pad_id=2, valid_vocab=49152)
    samples = gen.generate(model, prompts, GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=32),
                           seed=sample_seed(run_seed, step, micro, rank))
    samples.batch()   # a kd.data Batch: prompt + completion, right-padded; labels only on completion tokens

`transformers` runs `model.generate` in-process on the training device (KV cache), seeded: every
draw comes from a `torch.Generator` of its own, seeded from (run seed, step, micro-batch, rank), so
the samples depend on nothing else (a resumed run samples exactly what the uninterrupted one did; the
generator is made afresh per micro-batch, so a checkpoint needs no generator state). torch's
process-wide generator is neither read nor touched: a sweep's concurrent trials are threads of one
process, and two trials seeding it would draw each other's samples (issue 26). transformers' sampling
takes no generator, so a last logits processor (`_Draw`) applies temperature and top-p (transformers'
own warpers), draws the token from the generator and leaves only that token possible; `generate` then
runs greedy. A logits processor first removes ids >= valid_vocab (tokenizer padding rows the loss
excludes), so a draw can never be a label the loss refuses.

The seam for a serving engine (vLLM colocated, or an OpenAI-compatible server): implement
`Generator.generate(model, prompts, settings, seed) -> Samples` (token ids in, token ids out, same
stop / valid-vocab rules; a colocated engine must be handed the current student weights each step)
and register it in GENERATORS; `kd.on_policy.generator` picks it by name. Only "transformers" exists.
Under FSDP2 (`full_parameters`), every layer is gathered once for the whole generation, and
`synced_gpus` keeps ranks stepping together until the last one is done.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from kd.data.prepared import IGNORE, Batch

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32

    @classmethod
    def of(cls, op) -> "GenerationSettings":  # op: kd.config.OnPolicyConfig
        return cls(temperature=op.temperature, top_p=op.top_p, max_new_tokens=op.max_new_tokens)


@dataclass
class Samples:
    """Prompts and their sampled completions (each cut after its first stop token), as token ids."""

    prompts: list[list[int]]
    completions: list[list[int]]
    pad_id: int
    seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)  # ended with a stop token (not the length budget)

    @property
    def new_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    def batch(self) -> Batch:
        """Right-padded (B, L) ids; labels (B, L-1) set on completion tokens only (the prompt and padding are
        -100, so they carry no loss and get no gradient); position ids 0..L-1 (padding sits after every real
        token, so causal attention never lets a real token see it)."""
        rows = [p + c for p, c in zip(self.prompts, self.completions)]
        L = max(2, max(len(r) for r in rows))
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L - 1), IGNORE, dtype=torch.long)
        for i, (p, c) in enumerate(zip(self.prompts, self.completions)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            if c:
                labels[i, len(p) - 1: len(p) - 1 + len(c)] = torch.tensor(c, dtype=torch.long)
        return Batch(ids, labels, torch.arange(L).expand(len(rows), L).clone())


class Generator(Protocol):
    name: str

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], settings: GenerationSettings,
                 *, seed: int, synced: bool = False) -> Samples:
        """Sample one completion per prompt from `model` (its current weights)."""


def sample_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The generator seed of one micro-batch on one rank: a pure function of where it is in the run."""
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863 + 17) % (2**63 - 1)


def stop_ids_of(model_dir: str | Path) -> set[int]:
    """EOS ids of the model's generation/config files and the tokenizer's end-of-turn tokens, when present."""
    d = Path(model_dir)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        if (d / name).is_file():
            eos = json.loads((d / name).read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if (d / "tokenizer.json").is_file():
        from kd.data.sources import eos_id, load_tokenizer

        tok = load_tokenizer(d)
        ids.update(i for i in (tok.token_to_id(t) for t in END_OF_TURN) if i is not None)
        with contextlib.suppress(Exception):
            ids.add(eos_id(d))
    return {int(i) for i in ids}


class _ValidVocab:
    """Logits processor: ids >= valid_vocab get -inf, so they are never sampled."""

    def __init__(self, valid_vocab: int):
        self.valid_vocab = valid_vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.valid_vocab:
            scores[:, self.valid_vocab:] = float("-inf")
        return scores


class _Draw:
    """Last logits processor: temperature and top-p (transformers' warpers, the semantics of its sampling),
    then one draw per row from `generator`; the returned scores are 0 at the drawn id and -inf elsewhere,
    so greedy decoding picks exactly the draw and torch's process-wide generator is never used."""

    def __init__(self, settings: GenerationSettings, generator: torch.Generator):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generator = generator
        self.warpers = ([TemperatureLogitsWarper(settings.temperature)] if settings.temperature != 1.0 else []) + \
            ([TopPLogitsWarper(settings.top_p)] if settings.top_p < 1.0 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module):
    """FSDP2: gather every sharded unit once and keep it gathered for the whole generation (else each
    decoding step all-gathers each layer again); reshard afterwards. No-op for unsharded models."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
    try:
        yield bool(units)
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True, recurse=False)


class TransformersGenerator:
    """In-process `model.generate` (sampling, KV cache) on the model's device."""

    name = "transformers"

    def __init__(self, *, stop_ids: set[int], pad_id: int, valid_vocab: int, autocast: bool = False):
        if not stop_ids:
            raise ValueError("generation needs at least one stop (EOS / end-of-turn) id")
        self.stop_ids, self.pad_id, self.valid_vocab, self.autocast = sorted(stop_ids), pad_id, valid_vocab, autocast

    def generate(self, model, prompts, settings: GenerationSettings, *, seed: int, synced: bool = False) -> Samples:
        from transformers import GenerationConfig, LogitsProcessorList

        t0 = time.perf_counter()
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        # greedy over _Draw's one-hot scores: the sampling happened in _Draw, from its own generator. Every
        # sampling field is set, so none is filled in from the model's generation_config.
        gc = GenerationConfig(do_sample=False, num_beams=1, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=settings.max_new_tokens, eos_token_id=self.stop_ids,
                              pad_token_id=self.pad_id, use_cache=True)
        generator = torch.Generator(device=device).manual_seed(seed)
        processors = LogitsProcessorList([_ValidVocab(self.valid_vocab), _Draw(settings, generator)])
        was_training = model.training
        model.eval()  # no dropout, and the KV cache (gradient checkpointing turns it off in train mode)
        try:
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.autocast), \
                    full_parameters(model) as sharded:
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc,
                                     logits_processor=processors, synced_gpus=sharded and synced)
        finally:
            model.train(was_training)
        new = out[:, width:].tolist()
        completions, stopped = [], []
        stops = set(self.stop_ids)
        for row in new:
            cut = next((j + 1 for j, t in enumerate(row) if t in stops), None)
            completions.append(row[:cut] if cut else row)
            stopped.append(cut is not None)
        return Samples([list(p) for p in prompts], completions, self.pad_id, time.perf_counter() - t0, stopped)


GENERATORS = {"transformers": TransformersGenerator}


def get_generator(name: str, **kwargs) -> Generator:
    try:
        return GENERATORS[name](**kwargs)
    except KeyError:
        raise ValueError(f"kd.on_policy.generator: unknown generator {name!r}; known: {sorted(GENERATORS)}") from None
