"""Can this teacher teach this student token for token? Compare vocabularies and decide.

    from kd.vocab import align_vocab, measure_dropped_mass
    va = align_vocab(teacher_snapshot.local_dir, student_snapshot.local_dir)   # VocabAlignment or VocabError
    if va.verdict == "teacher-padded":
        mean, mx = measure_dropped_mass(teacher, sample_ids, va.valid_vocab)
        va = va.model_copy(update={"dropped_mass_mean": mean, "dropped_mass_max": mx})

Compared: output-matrix rows (`vocab_size` in config.json), tokenizer sizes (added tokens
included), the token string of every id both tokenizers have, and the eos/pad/bos ids.
Verdicts:
- `identical`: same rows, same tokenizer;
- `teacher-padded`: the teacher has more rows and/or extra tokens after the student's, and the
  shared ids are the same tokens (Qwen2.5-7B: 152,064 rows vs 151,936, one 151,665-token
  tokenizer). The loss keeps `rows_kept` = student rows of the teacher's matrix and masks ids
  ≥ `valid_vocab` (= student tokenizer size) from both softmaxes, so the teacher mass on those ids
  is dropped: measure it on a sample and refuse the run when it is not negligible.
- `cross-tokenizer` (only with `cross_tokenizer=True`, the run's `kd.cross_tokenizer.enabled`): the
  tokenizers differ (a differing token, a differing special id, a larger student); training compares
  byte-aligned groups (kd/cross_tokenizer/). `rows_kept` = the teacher tokenizer's size (teacher rows the
  loss reads), `valid_vocab` = the student tokenizer's size; kd.cross_tokenizer.report adds the alignment
  statistics on a sample of the training text.
Anything else (student larger, a differing token, a differing special id, without kd.cross_tokenizer) raises
VocabError naming the setting. `padding_ids` = [valid_vocab, teacher rows - 1]: every teacher id the loss ignores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd.errors import ModelError, VocabError
from kd.train.losses import iter_logit_chunks
from kd.results import VocabAlignment

SPECIALS = ("eos", "pad", "bos")
SHOW = 5  # differing ids named in an error message
CROSS_HINT = ("; to distil across tokenizer families (byte-aligned groups), set kd.cross_tokenizer.enabled: true")


def align_vocab(teacher_dir: str | Path, student_dir: str | Path, *, cross_tokenizer: bool = False) -> VocabAlignment:
    """Compare the two model folders; VocabAlignment, or VocabError naming what differs. cross_tokenizer: a
    differing tokenizer gives the verdict `cross-tokenizer` instead of the error."""
    try:
        return _align_same(teacher_dir, student_dir)
    except _TokenizersDiffer as err:
        if not cross_tokenizer:
            raise VocabError(str(err) + CROSS_HINT) from None
    t_dir, s_dir = Path(teacher_dir), Path(student_dir)
    t_tok, s_tok = _id_to_token(t_dir, "teacher"), _id_to_token(s_dir, "student")
    return VocabAlignment(
        verdict="cross-tokenizer", teacher_rows=_rows(t_dir), student_rows=_rows(s_dir),
        teacher_tokenizer_size=len(t_tok), student_tokenizer_size=len(s_tok),
        rows_kept=len(t_tok), valid_vocab=len(s_tok), padding_ids=[],
        special_tokens=_specials(s_dir, s_tok),  # the student's: what it generates and stops on
    )


class _TokenizersDiffer(VocabError):
    """The two tokenizers are not one family (a same-vocabulary loss cannot pair their ids)."""


def _align_same(teacher_dir: str | Path, student_dir: str | Path) -> VocabAlignment:
    t_dir, s_dir = Path(teacher_dir), Path(student_dir)
    t_rows, s_rows = _rows(t_dir), _rows(s_dir)
    t_tok, s_tok = _id_to_token(t_dir, "teacher"), _id_to_token(s_dir, "student")
    for name, rows, tok in (("teacher", t_rows, t_tok), ("student", s_rows, s_tok)):
        if len(tok) > rows:
            raise VocabError(
                f"{name} tokenizer has {len(tok)} tokens but its output matrix only {rows} rows "
                f"(config.json vocab_size): ids ≥ {rows} have no logits"
            )
    if s_rows > t_rows or len(s_tok) > len(t_tok):
        raise _TokenizersDiffer(
            f"student-larger: the student vocabulary ({s_rows} rows, {len(s_tok)} tokens) is larger than the "
            f"teacher's ({t_rows} rows, {len(t_tok)} tokens); the teacher has no targets for the extra student ids. "
            "Use a teacher whose tokenizer contains the student's."
        )
    diff = [i for i in range(len(s_tok)) if t_tok[i] != s_tok[i]]
    if diff:
        shown = ", ".join(f"id {i}: teacher {t_tok[i]!r} vs student {s_tok[i]!r}" for i in diff[:SHOW])
        raise _TokenizersDiffer(
            f"tokenizers differ on {len(diff)} of {len(s_tok)} shared ids (first: {shown}); "
            "distillation needs the same token at every shared id"
        )
    t_special, s_special = _specials(t_dir, t_tok), _specials(s_dir, s_tok)
    for name in SPECIALS:
        t_id, s_id = t_special[name], s_special[name]
        if t_id is not None and s_id is not None and t_id != s_id:
            raise _TokenizersDiffer(
                f"special token {name} differs: teacher id {t_id} ({_tok(t_tok, t_id)!r}) vs "
                f"student id {s_id} ({_tok(s_tok, s_id)!r})"
            )
    same = t_rows == s_rows and len(t_tok) == len(s_tok)
    valid = len(s_tok)
    return VocabAlignment(
        verdict="identical" if same else "teacher-padded",
        teacher_rows=t_rows,
        student_rows=s_rows,
        teacher_tokenizer_size=len(t_tok),
        student_tokenizer_size=len(s_tok),
        rows_kept=s_rows,
        valid_vocab=valid,
        padding_ids=[valid, t_rows - 1] if t_rows > valid else [],
        special_tokens={n: t_special[n] if t_special[n] is not None else s_special[n] for n in SPECIALS},
    )


@torch.no_grad()
def measure_dropped_mass(
    teacher_model: torch.nn.Module,
    input_ids: torch.Tensor,
    rows_kept: int,
    backend: str = "hf",
    *,
    chunk_size: int = 256,
) -> tuple[float, float]:
    """(mean, max) over tokens of the teacher probability on ids ≥ `rows_kept`.

    input_ids: (B, T). Pass `VocabAlignment.valid_vocab` as `rows_kept` to count everything the
    loss drops (cut rows and masked padding ids). Logits are built `chunk_size` tokens at a time
    from the final hidden states and the output matrix (never (B*T, V) at once), in float32.
    """
    from backends import get_backend

    be = get_backend(backend)
    weight, bias = be.output_head(teacher_model)
    if rows_kept >= weight.shape[0]:
        return 0.0, 0.0
    with torch.no_grad():  # a measurement: no autograd graph through the teacher
        hidden = be.hidden_states(teacher_model, input_ids)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    masses = []
    for _, logits in iter_logit_chunks(hidden, weight, bias, chunk_size=chunk_size):  # (c, V) fp32
        # log p(dropped) = logsumexp(dropped logits) - logsumexp(all logits): stable for any V
        masses.append((logits[:, rows_kept:].logsumexp(-1) - logits.logsumexp(-1)).exp())
    m = torch.cat(masses)
    return float(m.mean()), float(m.max())


# --------------------------------------------------------------------------- reading model folders
def _rows(d: Path) -> int:
    cfg = _json(d / "config.json")
    if cfg is None:
        raise ModelError(f"{d}: no config.json")
    rows = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(rows, int) or rows <= 0:
        raise ModelError(f"{d}/config.json: no vocab_size")
    return rows


def _id_to_token(d: Path, role: str) -> list[str | None]:
    """Token string of every id (added tokens included); None for ids no token uses.

    No tokenizer at all is named as such ("teacher tokenizer missing"), never left to look like an
    empty vocabulary, which the size comparison would misreport as "student-larger"."""
    from kd.inspect_model import OTHER_TOKENIZER_FILES

    missing = ModelError(f"{role} tokenizer missing: {d / 'tokenizer.json'}")
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception as err:  # a truncated or mangled file: the Rust parser's message, and which file
            raise ModelError(f"{d / 'tokenizer.json'}: cannot be read as a tokenizer ({str(err)[:200]})") from None
    elif not any((d / f).is_file() for f in OTHER_TOKENIZER_FILES):
        raise missing
    else:  # e.g. sentencepiece-only folders: let transformers build the tokenizer
        from transformers import AutoTokenizer

        try:
            vocab = AutoTokenizer.from_pretrained(d, trust_remote_code=False).get_vocab()
        except (OSError, ValueError) as err:
            raise ModelError(f"{d}: cannot load its tokenizer: {err}") from err
    if not vocab:
        raise missing
    out: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, i in vocab.items():
        out[i] = token
    return out


def _specials(d: Path, id_to_token: list[str | None]) -> dict[str, int | None]:
    """eos/pad/bos ids: the tokenizer config's tokens first, then generation_config.json, config.json."""
    lookup = {t: i for i, t in enumerate(id_to_token) if t is not None}
    tok_cfg = _json(d / "tokenizer_config.json") or {}
    id_sources = [_json(d / "generation_config.json") or {}, _json(d / "config.json") or {}]
    out: dict[str, int | None] = {}
    for name in SPECIALS:
        token = tok_cfg.get(f"{name}_token")
        if isinstance(token, dict):
            token = token.get("content")
        found = lookup.get(token) if isinstance(token, str) else None
        for src in id_sources:
            if found is not None:
                break
            v = src.get(f"{name}_token_id")
            found = v[0] if isinstance(v, list) and v else v if isinstance(v, int) else None
        out[name] = found
    return out


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: unreadable JSON: {err}") from err
    return data if isinstance(data, dict) else None


def _tok(id_to_token: list[str | None], i: int) -> str | None:
    return id_to_token[i] if 0 <= i < len(id_to_token) else None
