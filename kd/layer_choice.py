"""Which teacher decoder layers a pruned student keeps, measured on calibration text (issue 27, item 3).

    calib = calibration_from_text("bundled:english", teacher_dir)       # or calibration_from_prepared(root)
    choice = measure_layers(model, calib, keep=20, strategy="measured")  # LayerChoice: layers + per-layer scores

Strategies (`student.init.from_teacher.strategy`, `kdflow make-student --strategy`):

- `even`: evenly spaced, first and last included (no measurement).
- `block-influence`: ShortGPT (Men et al. 2024): BI_i = 1 - mean over tokens of cos(h_in_i, h_out_i); keep the
  `keep` layers with the largest BI (the ones that change the hidden state most). One teacher pass.
- `measured` (the default): greedy removal on the calibration loss. Starting from every layer, drop, one at a
  time, the layer whose removal raises the calibration cross-entropy least, measured by running the pruned stack
  itself (exactly what the pruned student computes), until `keep` remain. Per-layer BI fails on SmolLM2-135M
  (it keeps early layers and drops a run of late ones, like the "first 18 + last 2" heuristic that scores worse
  than even spacing); the greedy loss criterion accounts for how removals interact. Cost: one forward of the
  layers after the dropped one per candidate (hidden states before it are reused); `RECHECK` best candidates of
  the previous round are re-measured each round (a lazy greedy), all of them in the first round.

The first and last layers are always kept (their single-drop loss is measured and reported all the same; on
SmolLM2-135M dropping layer 0 alone costs the most of all, 11.6 nats/token vs 1.8 for the whole teacher).
Every score is computed on the calibration blocks only; held-out text never enters the choice (bench/layer_choice.py measures the choice on text it did not see).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd.errors import DataError, ModelError

STRATEGIES = ("measured", "block-influence", "even")
DEFAULT_STRATEGY = "measured"
CALIBRATION_BLOCKS = 4  # blocks of CALIBRATION_SEQ_LEN tokens: 512 tokens, ~1 minute for SmolLM2 20 of 30 on 2 cores
CALIBRATION_SEQ_LEN = 128
RECHECK = 6  # candidates re-measured per greedy round (lazy greedy); the first round measures every layer
METHOD_VERSION = 1  # bump when a strategy's arithmetic changes, so cached pruned students are rebuilt


@dataclass
class Calibration:
    """Token blocks the choice is measured on: ids (B, L), labels (B, L-1) (-100 = no loss), position ids."""

    ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    source: str
    sha256: str = field(default="")

    def __post_init__(self):
        if not self.sha256:
            h = hashlib.sha256()
            for t in (self.ids, self.labels, self.position_ids):
                h.update(t.to(torch.int64).contiguous().numpy().tobytes())
            self.sha256 = h.hexdigest()

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def describe(self) -> dict:
        return {"source": self.source, "blocks": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
                "tokens": self.tokens, "sha256": self.sha256}


@dataclass
class LayerChoice:
    strategy: str
    layers: list[int]
    scores: list[dict]  # one per teacher layer: layer, block_influence, drop_loss, dropped_at, kept
    full_loss: float | None = None  # calibration CE (nats/token) of the whole teacher
    kept_loss: float | None = None  # ... of the kept stack
    calibration: dict | None = None
    wall_s: float = 0.0


# ------------------------------------------------------------------------------------------- calibration text
def calibration_from_prepared(root: str | Path, n_blocks: int = CALIBRATION_BLOCKS) -> Calibration:
    """`n_blocks` blocks of a prepared set's *train* split (evenly spread over it; never the held-out split)."""
    from kd.data.prepared import open_prepared

    ps = open_prepared(root)
    n = len(ps.train)
    if n == 0:
        raise DataError(f"{root}: the prepared training split is empty; nothing to measure the layers on")
    rows = sorted({round(i * (n - 1) / max(1, n_blocks - 1)) for i in range(min(n_blocks, n))})
    b = ps.train.batch(rows)
    return Calibration(b.ids, b.labels, b.position_ids,
                       source=f"prepared:{ps.content_hash[:16]} train rows {','.join(map(str, rows))}")


def calibration_from_text(source: str, tokenizer_dir: str | Path, n_blocks: int = CALIBRATION_BLOCKS,
                          seq_len: int = CALIBRATION_SEQ_LEN) -> Calibration:
    """The first `n_blocks` x `seq_len` tokens of a text source: `bundled:NAME`, a .txt file (one document a
    line) or a folder of them; each document ends with the tokenizer's EOS, as prepare_data packs them."""
    from kd.bundled import text_files
    from kd.data.sources import eos_id, load_tokenizer

    files = text_files(source)
    if not files:
        raise DataError(f"--calibration {source!r}: no such text file or folder of .txt files")
    tok, eos = load_tokenizer(tokenizer_dir), eos_id(tokenizer_dir)
    want = n_blocks * seq_len
    ids: list[int] = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                ids += tok.encode(line, add_special_tokens=False).ids + [eos]
            if len(ids) >= want:
                break
        if len(ids) >= want:
            break
    if len(ids) < want:
        raise DataError(f"calibration {source!r}: {len(ids)} tokens, need {want} ({n_blocks} blocks of {seq_len})")
    t = torch.tensor(ids[:want], dtype=torch.int64).view(n_blocks, seq_len)
    pos = torch.arange(seq_len).expand(n_blocks, seq_len).clone()
    return Calibration(t, t[:, 1:].clone(), pos, source=f"{source} (first {want} tokens)")


# ------------------------------------------------------------------------------------------- running a stack
class _Stack:
    """Runs any subset of the teacher's decoder layers over the calibration blocks, as the pruned student
    would: each layer gets the keyword arguments (mask, rotary embeddings, ...) the teacher itself gave it,
    captured in one full forward."""

    def __init__(self, model, calib: Calibration):
        self.model, self.calib = model, calib
        decoder = model.get_decoder()
        self.layers = list(decoder.layers)
        self.norm = getattr(decoder, "norm", None)
        if self.norm is None:
            raise ModelError(f"{type(model).__name__}: no final norm found at get_decoder().norm; "
                             "use strategy even or give layers")
        self.head = model.get_output_embeddings()
        self.kwargs: list[dict] = [{} for _ in self.layers]
        self.h_in: list[torch.Tensor] = [None] * len(self.layers)
        self.h_out: list[torch.Tensor] = [None] * len(self.layers)
        hooks = []
        for i, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            hooks.append(layer.register_forward_hook(self._post(i)))
        try:
            with torch.no_grad():
                model(input_ids=calib.ids, position_ids=calib.position_ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        self.embeddings = self.h_in[0]

    def _pre(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.h_in[i] = h.detach()
            self.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            self.kwargs[i]["use_cache"] = False
            self.kwargs[i].pop("past_key_values", None)
            self.kwargs[i].pop("past_key_value", None)
        return hook

    def _post(self, i):
        def hook(module, args, kwargs_or_out, out=None):
            o = out if out is not None else kwargs_or_out
            self.h_out[i] = (o[0] if isinstance(o, tuple) else o).detach()
        return hook

    def run(self, h: torch.Tensor, layers: list[int]) -> torch.Tensor:
        with torch.no_grad():
            for i in layers:
                o = self.layers[i](h, **self.kwargs[i])
                h = o[0] if isinstance(o, tuple) else o
        return h

    def loss(self, h: torch.Tensor) -> float:
        """Mean next-token cross-entropy (nats) of final hidden states `h` on the calibration labels."""
        with torch.no_grad():
            logits = self.head(self.norm(h[:, :-1])).float()
            return float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self.calib.labels.reshape(-1), ignore_index=-100))

    def block_influence(self) -> list[float]:
        out = []
        for a, b in zip(self.h_in, self.h_out):
            cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
            out.append(float(1.0 - cos.mean()))
        return out


def choose_layers(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced, first and last included: (30, 10) -> 0,3,6,10,...,29."""
    if not 0 < keep <= total:
        raise ModelError(f"keep_layers must be between 1 and the teacher's {total} layers, got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def _protected(total: int, keep: int) -> set[int]:
    return {0} if keep < 2 or total < 2 else {0, total - 1}


def measure_layers(model, calib: Calibration, keep: int, strategy: str = DEFAULT_STRATEGY,
                   recheck: int = RECHECK) -> LayerChoice:
    """Rank the teacher `model`'s decoder layers on `calib` and choose `keep` of them (see the module doc)."""
    import time

    if strategy not in STRATEGIES:
        raise ModelError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    t0 = time.perf_counter()
    model.eval()
    stack = _Stack(model, calib)
    total = len(stack.layers)
    choose_layers(total, keep)  # the range check and its message
    bi = stack.block_influence()
    full_h = stack.h_out[-1]
    full_loss = stack.loss(full_h)
    protected = _protected(total, keep)

    # single-drop loss of every layer: the greedy's first round (only when there is a choice to make)
    drop_loss: list[float | None] = [None] * total
    if strategy == "measured" and len(protected) < keep < total:
        drop_loss = [stack.loss(stack.run(stack.h_in[i], list(range(i + 1, total)))) for i in range(total)]
    dropped_at: dict[int, int] = {}

    if strategy == "even":
        layers = choose_layers(total, keep)
    elif strategy == "block-influence":
        free = sorted((i for i in range(total) if i not in protected), key=lambda i: (-bi[i], i))
        layers = sorted(protected | set(free[: max(0, keep - len(protected))]))
    elif keep <= len(protected) or keep == total:
        layers = sorted(protected)[:keep] if keep < total else list(range(total))
    else:
        kept = list(range(total))
        last = {i: drop_loss[i] for i in range(total)}  # most recent measured loss with layer i dropped
        rnd = 0
        while len(kept) > keep:
            rnd += 1
            cands = sorted((i for i in kept if i not in protected), key=lambda i: (last[i], i))
            if rnd > 1:
                cands = cands[:recheck]
                prefix = {kept[0]: stack.embeddings}  # hidden state entering each kept layer, built lazily
                h = stack.embeddings
                need = max(kept.index(c) for c in cands)
                for j in range(need + 1):
                    prefix[kept[j]] = h
                    if j < need:
                        h = stack.run(h, [kept[j]])
                for c in cands:
                    j = kept.index(c)
                    last[c] = stack.loss(stack.run(prefix[c], kept[j + 1:]))
            best = min(cands, key=lambda i: (last[i], i))
            kept.remove(best)
            dropped_at[best] = rnd
        layers = kept

    kept_h = stack.run(stack.embeddings, layers)
    scores = [{"layer": i, "block_influence": round(bi[i], 6), "drop_loss": None if drop_loss[i] is None else round(drop_loss[i], 6),
               "dropped_at": dropped_at.get(i), "kept": i in layers} for i in range(total)]
    return LayerChoice(strategy=strategy, layers=layers, scores=scores, full_loss=round(full_loss, 6),
                       kept_loss=round(stack.loss(kept_h), 6), calibration=calib.describe(),
                       wall_s=round(time.perf_counter() - t0, 2))


def choice_markdown(info: dict) -> str:
    """A markdown table of a pruned student's layer scores (the pull_models artifact)."""
    scores = info.get("scores") or []
    cal = info.get("calibration") or {}
    kept = info.get("layers") or []
    head = (f"# Layers kept: {len(kept)} of {info.get('teacher_layers')} (strategy `{info.get('strategy', 'even')}`)\n\n"
            f"Kept: {', '.join(map(str, kept))}\n\n")
    if not scores:
        return head + "No measurement (layers given, or evenly spaced).\n"
    fmt = lambda x: "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"  # noqa: E731
    head += (f"Calibration: {cal.get('source')}, {cal.get('tokens', 0):,} tokens, sha256 {str(cal.get('sha256'))[:16]}…; "
             f"loss (nats/token): teacher {fmt(info.get('full_loss'))}, kept stack {fmt(info.get('kept_loss'))}.\n\n"
             "Block influence = 1 − mean cos(h_in, h_out) (ShortGPT); drop loss = calibration loss with only this "
             "layer removed; dropped at = the greedy round that removed it (measured strategy).\n\n"
             "| layer | block influence | drop loss | dropped at | kept |\n|---|---|---|---|---|\n")
    rows = [f"| {s['layer']} | {fmt(s.get('block_influence'))} | {fmt(s.get('drop_loss'))} | "
            f"{s.get('dropped_at') or '–'} | {'yes' if s.get('kept') else ''} |" for s in scores]
    return head + "\n".join(rows) + "\n"


def bits_per_byte(model, tokenizer_dir: str | Path, lines: list[str]) -> dict:
    """Summed NLL in bits over the UTF-8 bytes of `lines` (each scored on its own after an EOS token)."""
    from kd.data.sources import eos_id, load_tokenizer

    tok, eos = load_tokenizer(tokenizer_dir), eos_id(tokenizer_dir)
    bits = 0.0
    nbytes = 0
    ntok = 0
    model.eval()
    for line in lines:
        ids = [eos] + tok.encode(line, add_special_tokens=False).ids
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        bits += float(nll) / math.log(2)
        nbytes += len(line.encode("utf-8"))
        ntok += len(ids) - 1
    return {"bits_per_byte": bits / nbytes, "bytes": nbytes, "tokens": ntok}


__all__ = ["STRATEGIES", "DEFAULT_STRATEGY", "Calibration", "LayerChoice", "calibration_from_prepared",
           "calibration_from_text", "measure_layers", "choice_markdown", "bits_per_byte"]
