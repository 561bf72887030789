"""Records -> token ids and a loss mask, for text, chat and prompt/completion data.

    enc = RecordEncoder.for_config(cfg.data, student_dir, fmt="chat")
    out = enc.encode(kinds="json", raws=['{"messages": [...]}'], lines=[1])
    out["ids"][0], out["targets"][0], out["bad"][0]     # ids, 1 = token carries the loss, "" = ok

`targets[i] = 1` means token i is predicted by the model (from token i-1) and counts in the loss.
A bad record is not raised here (this runs inside `datasets.map` worker processes): it comes back
with empty ids and `bad = "field: problem"`; the caller raises (naming file and line) or counts it.

Chat: the student's chat template renders the conversation. Assistant spans come from
`apply_chat_template(..., return_assistant_tokens_mask=True)` when the template marks them with
`{% generation %}`, else from rendering prefix by prefix: the assistant turn i is the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) (end-of-turn tokens
included, so the student learns to stop). A template that does not render prefixes consistently is
refused rather than guessed at.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from kd.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
BLANK = "blank"  # a blank .txt line: a separator, not a bad record


def chat_template_of(tokenizer_dir: str | Path) -> str | None:
    """The chat template a tokenizer folder ships (tokenizer_config.json or chat_template.jinja)."""
    d = Path(tokenizer_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, list):  # named templates: use "default"
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t if isinstance(t, str) and t.strip() else None
    return None


class RecordEncoder:
    """Picklable: holds paths and settings; tokenizers are loaded lazily in each worker process."""

    def __init__(self, *, fmt: str, tokenizer_dir: str, eos: int, text_field: str, messages_field: str,
                 prompt_field: str, completion_field: str, train_on: str):
        self.fmt, self.tokenizer_dir, self.eos = fmt, str(tokenizer_dir), eos
        self.text_field, self.messages_field = text_field, messages_field
        self.prompt_field, self.completion_field, self.train_on = prompt_field, completion_field, train_on
        self._tok = self._hf = None
        if fmt == "chat" and chat_template_of(tokenizer_dir) is None:
            raise DataError(
                f"{Path(tokenizer_dir) / 'tokenizer_config.json'}: the student's tokenizer has no chat template "
                "(no chat_template there or in chat_template.jinja), so chat data (data.format=chat) cannot be "
                "rendered; use a chat model's tokenizer or data.format=text"
            )
        self.generation_marks = fmt == "chat" and "{% generation %}" in (chat_template_of(tokenizer_dir) or "")

    @classmethod
    def for_config(cls, cfg, tokenizer_dir, fmt: str, eos: int) -> "RecordEncoder":
        return cls(fmt=fmt, tokenizer_dir=str(tokenizer_dir), eos=eos, text_field=cfg.text_field,
                   messages_field=cfg.messages_field, prompt_field=cfg.prompt_field,
                   completion_field=cfg.completion_field, train_on=cfg.train_on)

    def __getstate__(self):
        return {**self.__dict__, "_tok": None, "_hf": None}

    # ------------------------------------------------------------------ tokenizers
    @property
    def tok(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(Path(self.tokenizer_dir) / "tokenizer.json"))
        return self._tok

    @property
    def hf(self):
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._hf

    # ------------------------------------------------------------------ records -> (text, spans)
    def _record(self, kind: str, raw):
        """(record dict or str, problem). kind: txt (a line), json (a JSON line), row (a dict)."""
        if kind == "txt":
            return raw, None
        if kind == "json":
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as err:
                return None, f"not valid JSON ({err.msg})"
            if not isinstance(rec, dict):
                return None, f"record is a JSON {type(rec).__name__}, not an object"
            return rec, None
        return raw, None

    def _string(self, rec: dict, field: str, *, allow_empty: bool = False):
        if field not in rec:
            return None, f"{field}: record has no field {field!r}"
        v = rec[field]
        if v is None:
            return None, f"{field}: is null"
        if not isinstance(v, str):
            return None, f"{field}: is {type(v).__name__}, not a string"
        if not allow_empty and not v.strip():
            return None, f"{field}: is empty"
        return v, None

    def _text(self, kind: str, rec):
        """-> (text, spans or None for all, append_eos, problem)."""
        if self.fmt == "text":
            if kind == "txt":
                return (rec, None, True, None) if rec.strip() else (None, None, True, BLANK)
            text, bad = self._string(rec, self.text_field)
            return text, None, True, bad
        if self.fmt == "prompt_completion":
            prompt, bad = self._string(rec, self.prompt_field, allow_empty=True)
            completion, bad2 = self._string(rec, self.completion_field)
            if bad or bad2:
                return None, None, True, bad or bad2
            text = prompt + completion
            spans = None if self.train_on == "all" else [(len(prompt), len(text))]
            return text, spans, True, None
        return self._chat(rec)

    def _messages(self, rec: dict):
        f = self.messages_field
        if f not in rec:
            return None, f"{f}: record has no field {f!r}"
        msgs = rec[f]
        if not isinstance(msgs, list) or not msgs:
            return None, f"{f}: is {'empty' if isinstance(msgs, list) else type(msgs).__name__}, not a list of messages"
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return None, f"{f}[{i}]: is {type(m).__name__}, not an object with role and content"
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                return None, f"{f}[{i}].role: {role!r} is not one of {', '.join(ROLES)}"
            if not isinstance(content, str):
                return None, f"{f}[{i}].content: is {type(content).__name__}, not a string"
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in out):
            return None, f"{f}: conversation has no assistant turn"
        return out, None

    def _chat(self, rec: dict):
        msgs, bad = self._messages(rec)
        if bad:
            return None, None, False, bad
        render = lambda ms, gen=False: self.hf.apply_chat_template(ms, tokenize=False,  # noqa: E731
                                                                   add_generation_prompt=gen)
        if self.generation_marks and self.train_on != "all":
            return self._chat_marked(msgs), None, False, None
        text = render(msgs)
        if self.train_on == "all":
            return text, None, False, None
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.train_on == "assistant_last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            start, end = render(msgs[:i], True) if i else "", render(msgs[: i + 1])
            if not (text.startswith(end) and end.startswith(start)):
                raise DataError(
                    f"{self.tokenizer_dir}: the chat template does not render conversations prefix by prefix "
                    "(an earlier part changes when later turns are added), so assistant spans cannot be found; "
                    "mark them with {% generation %} in the template or use data.train_on=all"
                )
            spans.append((len(start), len(end)))
        return text, spans, False, None

    def _chat_marked(self, msgs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, targets) from a template whose assistant parts sit in {% generation %} blocks."""
        out = self.hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = np.asarray(out["input_ids"], dtype=np.uint32)
        tgt = np.asarray(out["assistant_masks"], dtype=np.uint8)
        if self.train_on == "assistant_last" and tgt.any():  # keep the last run of ones only
            last = int(np.flatnonzero(tgt)[-1])
            first = last
            while first > 0 and tgt[first - 1]:
                first -= 1
            tgt[:first] = 0
        return ids, tgt

    # ------------------------------------------------------------------ batch encode
    def encode_flat(self, kind: str, raws: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(ids uint32, targets uint8, lengths int32, bad) for a batch, ids of all records end to end.
        Text takes a fast path (encode_batch_fast: no offsets; one flat copy of the ids), since the
        tokenizer itself should be the only real cost of preparing a large corpus."""
        if self.fmt != "text":
            out = self.encode(kind, raws, [0] * len(raws))
            cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
            return (cat(out["ids"], np.uint32), cat(out["targets"], np.uint8),
                    np.asarray(out["n"], np.int32), out["bad"])
        texts, bads = [], []
        for raw in raws:
            rec, bad = self._record(kind, raw)
            text = None
            if bad is None:
                text, _, _, bad = self._text(kind, rec)
            bads.append(bad or "")
            if bad is None:
                texts.append(text)
        id_lists = [e.ids for e in self.tok.encode_batch_fast(texts)] if texts else []
        lens = np.zeros(len(raws), np.int32)
        ok = np.fromiter((not b for b in bads), bool, count=len(bads))
        lens[ok] = np.fromiter((len(x) + 1 for x in id_lists), np.int32, count=len(id_lists))
        for x in id_lists:
            x.append(self.eos)
        total = int(lens.sum())
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), np.uint32, count=total)
        return ids, np.ones(total, np.uint8), lens, bads

    def encode(self, kinds: str, raws: list, lines: list[int]) -> dict:
        texts, metas, bads = [], [], []
        for raw in raws:
            rec, bad = self._record(kinds, raw)
            text = spans = None
            eos = True
            if bad is None:
                text, spans, eos, bad = self._text(kinds, rec)
            bads.append(bad or "")
            if bad is None and isinstance(text, str):
                texts.append(text)
                metas.append((spans, eos))
            elif bad is None:
                metas.append((text, None))  # already (ids, targets)
        encs = iter(self.tok.encode_batch(texts, add_special_tokens=self.fmt != "chat") if texts else [])
        ids_out, tgt_out, n_out = [], [], []
        it = iter(metas)
        for bad in bads:
            if bad:
                ids_out.append(np.zeros(0, np.uint32))
                tgt_out.append(np.zeros(0, np.uint8))
                n_out.append(0)
                continue
            spans, eos = next(it)
            if eos is None:  # pre-tokenised by the template ({% generation %} marks)
                ids_out.append(spans[0])
                tgt_out.append(spans[1])
                n_out.append(len(spans[0]))
                continue
            enc = next(encs)
            ids = np.asarray(enc.ids, dtype=np.uint32)
            if spans is None:
                tgt = np.ones(len(ids), np.uint8)
            else:
                starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
                special = np.asarray(enc.special_tokens_mask, dtype=bool)
                inside = np.zeros(len(ids), bool)
                for s, e in spans:
                    inside |= (starts >= s) & (starts < e)
                # special tokens added by the post-processor (BOS) have offsets (0, 0): never targets
                tgt = (inside & ~(special & (np.asarray([o[1] for o in enc.offsets]) == 0))).astype(np.uint8)
            if eos:
                ids = np.append(ids, np.uint32(self.eos))
                tgt = np.append(tgt, np.uint8(1 if spans is None or self.fmt == "prompt_completion" else 0))
            ids_out.append(ids)
            tgt_out.append(tgt)
            n_out.append(len(ids))
        return {"ids": ids_out, "targets": tgt_out, "n": n_out, "line": list(lines), "bad": bads}
