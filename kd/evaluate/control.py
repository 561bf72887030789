"""The control arm: did distillation beat plain fine-tuning of the same student on the same data?

    ctl = control_config(cfg)                  # α = 1 (CE only): same data, steps, lr, seed; no teacher
    docs = score_documents([kd_student, control], heldout_split, tokenizer_dir)   # per-document sums
    report = paired_report([docs, ref_docs], control_eval, cfg.eval, control_run=..., control_checkpoint_sha256=...)
    value_gate(report)                         # F-DISTILL-VALUE-001

With `eval.control` the flow trains the student a second time with α = 1 (fine-tuning on the labels only)
and everything else equal. Its config keeps only what fine-tuning depends on, so every KD setting of a
sweep (α, T, divergence, on-policy) shares one cached control. Both students are scored document by
document (a packed block's documents are told apart by their position ids restarting at 0) on the
held-out text of the training source and on a reference text the run did not train on. The difference
KD − control in bits per byte (and in loss per token) comes with a paired bootstrap interval over
documents: the same resampled documents for both students, so what the two share (a hard document is
hard for both) cancels. F-DISTILL-VALUE-001 claims "distillation beat fine-tuning": the interval on
`eval.control_metric`'s source lies below 0. The per-document sums are in the evidence, and the bootstrap
is seeded, so `kdflow evidence verify` recomputes the interval and the verdict.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from kd.config import EvalConfig, RunConfig
from kd.data.prepared import IGNORE
from kd.results import ControlReport, DocumentScores, Falsifier, ModelEval, PairedDifference

VALUE_ID = "F-DISTILL-VALUE-001"
LN2 = math.log(2)


def control_config(cfg: RunConfig) -> RunConfig:
    """The run's fine-tuning control: α = 1, no KD settings (all KD arms share it), online (no teacher cache)."""
    kd = type(cfg.kd)(alpha=1.0, chunk_size=cfg.kd.chunk_size)
    name = f"{cfg.name}-control" if cfg.name else None
    return cfg.model_copy(update={"kd": kd, "name": name})


@torch.no_grad()
def score_documents(models: list[torch.nn.Module], docs, tokenizer, *, valid_vocab: int, batch_size: int = 8,
                    chunk_size: int = 256, device="cpu", backend: str = "hf", source: str = "heldout") -> DocumentScores:
    """Each model's summed NLL (nats) of every scored token, per document, and each document's tokens and
    UTF-8 bytes (of the scored tokens' text, special tokens left out).

    `docs`: a prepared `Split` (its loss mask; documents split where position ids restart) or a list of
    token-id lists (every next token scored)."""
    from backends import get_backend
    from kd.evaluate.heldout import log_probs, output_rows

    be = get_backend(backend)
    for m in models:
        m.eval()
    heads = [output_rows(m, be, valid_vocab, f"model {i}") for i, m in enumerate(models)]
    nll = [[] for _ in models]
    tokens: list[int] = []
    text_ids: list[list[int]] = []
    for inp, pos, tgt, seg in _batches(docs, batch_size, valid_vocab, device):
        keep = (tgt != IGNORE).nonzero().squeeze(1)
        y, seg = tgt.index_select(0, keep), seg.index_select(0, keep)
        first = len(tokens)
        uniq, seg = torch.unique(seg, return_inverse=True)  # this batch's documents, 0..k-1
        k = len(uniq)
        tokens += torch.bincount(seg, minlength=k).tolist()
        text_ids += [y[seg == j].tolist() for j in range(k)]
        for i, (m, head) in enumerate(zip(models, heads)):
            h = be.hidden_states(m, inp, position_ids=pos)
            h = h.reshape(-1, h.shape[-1]).index_select(0, keep)
            sums = torch.zeros(k, dtype=torch.float64)
            for s in range(0, len(y), chunk_size):
                lp = log_probs(h[s:s + chunk_size], *head)
                tok_nll = -lp.gather(1, y[s:s + chunk_size, None]).squeeze(1).double().cpu()
                sums.index_add_(0, seg[s:s + chunk_size].cpu(), tok_nll)
            nll[i] += sums.tolist()
        assert len(tokens) == first + k
    n_bytes = [len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")) for ids in text_ids]
    keep_docs = [j for j, t in enumerate(tokens) if t > 0]
    return DocumentScores(source=source, tokens=[tokens[j] for j in keep_docs], bytes=[n_bytes[j] for j in keep_docs],
                          nll=[[row[j] for j in keep_docs] for row in nll])


def _batches(docs, batch_size: int, valid_vocab: int, device):
    """(inputs, position ids, labels (N,), document of each label (N,)) per batch; documents numbered globally."""
    from kd.evaluate.heldout import eval_batch

    if isinstance(docs, list):  # one token-id list per document, scored one at a time (no padding)
        for j, ids in enumerate(docs):
            x = torch.tensor([ids], dtype=torch.long)
            inp, pos, tgt = eval_batch(x, 0, 1, valid_vocab, device)
            yield inp, pos, tgt, torch.full_like(tgt, j)
        return
    offset = 0
    for start in range(0, len(docs), batch_size):
        inp, pos, tgt = eval_batch(docs, start, batch_size, valid_vocab, device)
        # label t (predicting token t+1) belongs to the document of token t; documents start where position
        # ids are 0, and every block opens a segment (a document continued from the previous block)
        starts = (pos == 0) if pos is not None else torch.zeros_like(inp, dtype=torch.bool)
        starts[:, 0] = True
        seg = torch.cumsum(starts.reshape(-1).long(), 0) - 1 + offset
        offset = int(seg.max()) + 1
        yield inp, pos, tgt, seg


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
    d = float(den.sum())
    return float(num.sum()) / d if d > 0 else float("nan")


def paired(scores: DocumentScores, *, samples: int, confidence: float, seed: int) -> list[PairedDifference]:
    """KD (model 0) − control (model 1) in bits per byte and loss per token, with a paired bootstrap over documents."""
    kd, ctl = (np.asarray(x, dtype=np.float64) for x in scores.nll[:2])
    toks, byts = np.asarray(scores.tokens, np.float64), np.asarray(scores.bytes, np.float64)
    n = len(toks)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n)) if n else np.zeros((samples, 0), np.int64)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    out = []
    for metric, den, scale in (("bits_per_byte", byts, 1 / LN2), ("loss_per_token", toks, 1.0)):
        def stat(a, rows=None):
            return scale * (_ratio(a, den) if rows is None else
                            a[rows].sum(axis=1) / np.where(den[rows].sum(axis=1) > 0, den[rows].sum(axis=1), np.nan))
        boot_kd, boot_ctl = stat(kd, idx), stat(ctl, idx)
        diffs = boot_kd - boot_ctl
        low, high = (np.quantile(diffs, [lo_q, hi_q]).tolist() if n else [float("nan")] * 2)
        out.append(PairedDifference(
            metric=metric, documents=n, kd=stat(kd), control=stat(ctl), difference=stat(kd) - stat(ctl),
            low=low, high=high, kd_stderr=float(np.std(boot_kd, ddof=1)) if n > 1 else float("nan"),
            control_stderr=float(np.std(boot_ctl, ddof=1)) if n > 1 else float("nan")))
    return out


def paired_report(scores: list[DocumentScores], control_eval: ModelEval, cfg: EvalConfig, *,
                  control_run: str | None, control_checkpoint_sha256: str | None) -> ControlReport:
    """The control's held-out metrics and, per scored source, KD − control with its interval."""
    diffs = {s.source: paired(s, samples=cfg.control_bootstrap_samples, confidence=cfg.control_confidence,
                              seed=cfg.control_bootstrap_seed) for s in scores}
    return ControlReport(control=control_eval, scores=scores, differences=diffs, value_source=_value_source(scores),
                         bootstrap_samples=cfg.control_bootstrap_samples, confidence=cfg.control_confidence,
                         bootstrap_seed=cfg.control_bootstrap_seed, control_run=control_run,
                         control_checkpoint_sha256=control_checkpoint_sha256)


def _value_source(scores: list[DocumentScores]) -> str:
    """The claim is about text the student did not train on when there is some: the reference text."""
    sources = [s.source for s in scores]
    return "reference" if "reference" in sources else sources[0] if sources else "heldout"


def value_gate(report: ControlReport | None) -> Falsifier:
    """F-DISTILL-VALUE-001: KD − control bits per byte on `value_source`, its whole interval below 0. Recomputed
    from the recorded per-document sums (the bootstrap is seeded), never read from the recorded interval."""
    claim = "distillation beat fine-tuning: KD − control bits per byte, paired bootstrap interval over documents, is below 0"
    if report is None:
        return Falsifier(id=VALUE_ID, claim=claim, observed="no control arm was trained (eval.control is off)",
                         verdict="fail")
    by = {s.source: s for s in report.scores}
    src = report.value_source
    if src not in by:
        return Falsifier(id=VALUE_ID, claim=claim, observed=f"no per-document scores for {src!r}", verdict="fail")
    d = next(x for x in paired(by[src], samples=report.bootstrap_samples, confidence=report.confidence,
                               seed=report.bootstrap_seed) if x.metric == "bits_per_byte")
    ok = d.high < 0  # NaN compares false: fail-closed
    where = "reference text (not trained on)" if src == "reference" else "held-out text of the training source"
    return Falsifier(id=VALUE_ID, claim=claim, verdict="pass" if ok else "fail",
                     observed=f"{where}, {d.documents} documents: KD {d.kd:.4f} vs control {d.control:.4f} bits/byte, "
                     f"difference {d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({report.confidence:.0%} interval)"
                     + ("" if ok else ": fine-tuning beat distillation" if d.low > 0 else
                        ": no difference this sample can tell apart from 0"))


def reference_token_ids(texts: list[str], tokenizer, *, max_tokens: int, max_documents: int) -> list[list[int]]:
    """Token ids of the reference documents (kd.evaluate.bundled_tasks reads eval.reference_text), each cut to
    `max_tokens`; at most `max_documents`, in file order."""
    docs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            docs.append(ids)
        if len(docs) >= max_documents:
            break
    return docs


def compare_control(config: RunConfig, models: dict, heldout, alignment, tokenizer_dir: str | Path, control_training,
                    *, after_reference: DocumentScores | None = None, device="cpu", backend: str = "hf") -> ControlReport:
    """The eval step's control part: the control's held-out table row, both students scored per document on the
    held-out split and on the reference text, and KD − control with paired intervals. `after_reference`: the
    student-after's reference scores when the eval already has them (only the control is then run there)."""
    from transformers import AutoTokenizer

    from kd.evaluate.heldout import evaluate_model

    ev = config.eval
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    v = alignment.valid_vocab
    control_eval = evaluate_model(models["control"], models["teacher"], heldout, rows_kept=alignment.rows_kept,
                                  valid_vocab=v, batch_size=ev.batch_size, chunk_size=config.kd.chunk_size,
                                  device=device, max_batches=ev.max_batches, backend=backend)
    pair = [models["student_after"], models["control"]]
    rows = min(len(heldout), ev.control_max_documents) if hasattr(heldout, "batch") else heldout[:ev.control_max_documents]
    heldout_docs = _first_rows(heldout, rows)
    scores = [score_documents(pair, heldout_docs, tok, valid_vocab=v, batch_size=ev.batch_size,
                              chunk_size=config.kd.chunk_size, device=device, backend=backend, source="heldout")]
    if ev.reference_text is not None:  # text the run did not train on (eval.reference_text)
        docs = reference_docs(config, tokenizer_dir)
        todo = pair if after_reference is None else [models["control"]]
        ref = score_documents(todo, docs, tok, valid_vocab=v, chunk_size=config.kd.chunk_size, device=device,
                              backend=backend, source="reference")
        if after_reference is not None:  # the same documents, tokens and bytes: only the KD student's row is reused
            ref = ref.model_copy(update={"nll": [after_reference.nll[0], ref.nll[0]]})
        scores.append(ref)
    prov = getattr(control_training, "produced_by", None)
    return paired_report(scores, control_eval, ev, control_run=prov.run_name if prov else None,
                         control_checkpoint_sha256=control_training.checkpoint_sha256)


def _first_rows(heldout, rows):
    """The held-out split limited to its first `rows` blocks (a bare tensor is already cut)."""
    if not hasattr(heldout, "batch"):
        return rows
    return _Head(heldout, rows)


class _Head:
    """The first `n` blocks of a prepared Split, read lazily (only `batch` and `len` are used)."""

    def __init__(self, split, n: int):
        self.split, self.n = split, n

    def __len__(self) -> int:
        return self.n

    def batch(self, rows):
        return self.split.batch(rows)


def reference_docs(config, student_dir) -> list[list[int]] | None:
    """eval.reference_text's documents as the student's token ids (None: no reference text)."""
    if config.eval.reference_text is None:
        return None
    from transformers import AutoTokenizer

    from kd.evaluate.bundled_tasks import reference_documents, reference_files

    return reference_token_ids(reference_documents(reference_files(config.eval.reference_text)),
                               AutoTokenizer.from_pretrained(student_dir), max_tokens=config.data.seq_len,
                               max_documents=config.eval.control_max_documents)
