"""What bytes each token stands for, and where each token of a text ends, in UTF-8 bytes.

    table = token_bytes(tok)                    # TokenBytes: .pieces[id] (bytes), .added[id] (bool), .scheme
    spans = byte_ends(tok, table, text)         # TokenSpans: .ids, .ends (int64, byte end of each token), .round_trip

Two tokenizers only agree on *bytes*: characters are the wrong unit, since a byte-level BPE token can hold
half of an emoji (GPT-2 splits "😀" into "ĠðŁĺ" + "Ģ") and a SentencePiece one can be a single byte
(`<0xF0>`). So every token id gets the exact bytes it decodes to:
- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): each character of the vocabulary string maps back to one
  byte through GPT-2's bytes<->unicode table;
- SentencePiece-style (Phi-3, Llama 2): "▁" is a space and `<0xNN>` is byte NN (byte fallback);
- added tokens (chat markup, specials): their literal content, flagged `added`.

A text's token spans are then the running sum of the tokens' byte lengths, which is exact whenever the
tokens spell the text (the usual case, "round trip"). SentencePiece adds a space the text does not have
(the dummy prefix "▁Hello" at the start, a lone "▁" after an added token): a token starting with a space
that the text lacks at that point is read as that phantom space plus the rest. When the tokens do not spell
the text (a normalizer rewrote it, e.g. NFC; an unknown token), the spans come from the tokenizer's
character offsets instead, converted to byte offsets: tokens sharing one character (a split multi-byte
character: overlapping offsets) share its bytes in order of their byte lengths, empty offsets are
zero-width, and ends are made non-decreasing and closed at the text's length. `round_trip` says which
path was taken; align.py counts the texts that did not round-trip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")



def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (Radford et al. 2019, openai/gpt-2 encoder.py): printable bytes map
    to themselves, the other 68 to chr(256 + n) in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


_U2B = _unicode_to_byte()


@dataclass(frozen=True)
class TokenBytes:
    """pieces[id]: the bytes token `id` stands for; added[id]: an added token (chat markup, special), whose
    bytes are its literal content; fallback[id]: a SentencePiece byte-fallback token `<0xNN>` (its byte may
    also be an ordinary piece: Phi-3 has both "!" and <0x21>); scheme: 'byte_level', 'sentencepiece' or
    'plain'; dummy_prefix: the tokenizer may put a space before text that has none (SentencePiece's "▁")."""

    pieces: tuple[bytes, ...]
    added: tuple[bool, ...]
    fallback: tuple[bool, ...]
    scheme: str
    dummy_prefix: bool

    def __len__(self) -> int:
        return len(self.pieces)


def _component_types(state: bytes | None) -> list[str]:
    """Every "type" named in a tokenizers component's JSON state (a Sequence's children included)."""
    if not state:
        return []
    return re.findall(r'"type":\s*"(\w+)"', state.decode() if isinstance(state, bytes) else state)


def token_bytes(tok) -> TokenBytes:
    """The bytes of every token id 0..len(tok)-1 of a fast tokenizer (see the module docstring)."""
    backend = tok.backend_tokenizer
    decoder = _component_types(backend.decoder.__getstate__() if backend.decoder else None)
    normalizer = backend.normalizer.__getstate__() if backend.normalizer else b""
    if "ByteLevel" in decoder:
        scheme = "byte_level"
    elif "ByteFallback" in decoder or "Metaspace" in decoder or "▁" in normalizer.decode():
        scheme = "sentencepiece"
    else:
        scheme = "plain"
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(len(tok), max(vocab.values()) + 1)
    strings: list[str | None] = [None] * n
    for s, i in vocab.items():
        strings[i] = s
    added_ids = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    pieces, added = [], []
    fallback = tuple(scheme == "sentencepiece" and s is not None and i not in added_ids
                     and _BYTE_TOKEN.match(s) is not None for i, s in enumerate(strings))
    for i, s in enumerate(strings):
        if i in added_ids:
            pieces.append(added_ids[i].encode())
            added.append(True)
        elif s is None:
            pieces.append(b"")
            added.append(False)
        else:
            pieces.append(_decode_piece(s, scheme))
            added.append(False)
    dummy = scheme == "sentencepiece"
    return TokenBytes(pieces=tuple(pieces), added=tuple(added), fallback=fallback, scheme=scheme, dummy_prefix=dummy)


def _decode_piece(s: str, scheme: str) -> bytes:
    if scheme == "byte_level":
        if all(c in _U2B for c in s):
            return bytes(_U2B[c] for c in s)
        return s.encode()
    if scheme == "sentencepiece":
        m = _BYTE_TOKEN.match(s)
        if m:
            return bytes([int(m.group(1), 16)])
        return s.replace("▁", " ").encode()
    return s.encode()


@dataclass(frozen=True)
class TokenSpans:
    """ids (n,) int64 token ids; ends (n,) int64: token k covers text bytes ends[k-1]..ends[k] (ends[-1] before
    the first is 0), non-decreasing, the last one the text's byte length; round_trip: the tokens' bytes spell
    the text (phantom SentencePiece spaces aside), so the spans are exact."""

    ids: np.ndarray
    ends: np.ndarray
    round_trip: bool


def byte_ends(tok, table: TokenBytes, text: str, *, ids: list[int] | None = None,
              offsets: list[tuple[int, int]] | None = None) -> TokenSpans:
    """Tokenize `text` (no special tokens added) and give each token's UTF-8 byte end (module docstring).

    `ids` / `offsets` may be passed when the caller already encoded the text (batch encoding)."""
    if ids is None:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    tb = text.encode()
    lens = np.fromiter((len(table.pieces[i]) for i in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lens)
    ids_a = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return TokenSpans(ids_a, ends, round_trip=len(tb) == 0)
    if int(ends[-1]) == len(tb) and b"".join(table.pieces[i] for i in ids) == tb:
        return TokenSpans(ids_a, ends, round_trip=True)
    if table.dummy_prefix:
        walked = _walk_with_phantom_spaces(table, ids, tb)
        if walked is not None:
            return TokenSpans(ids_a, walked, round_trip=True)
    if offsets is None:
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return TokenSpans(ids_a, _ends_from_offsets(text, offsets, lens), round_trip=False)


def _walk_with_phantom_spaces(table: TokenBytes, ids: list[int], tb: bytes) -> np.ndarray | None:
    """Match token bytes against the text left to right; a token starting with a space the text lacks there
    is a phantom space plus the rest. None when the tokens do not spell the text this way."""
    ends = np.empty(len(ids), dtype=np.int64)
    pos = 0
    for k, i in enumerate(ids):
        piece = table.pieces[i]
        if tb.startswith(piece, pos):
            pos += len(piece)
        elif piece[:1] == b" " and not table.added[i] and tb.startswith(piece[1:], pos):
            pos += len(piece) - 1
        else:
            return None
        ends[k] = pos
    return ends if pos == len(tb) else None


def _ends_from_offsets(text: str, offsets, lens: np.ndarray) -> np.ndarray:
    """Character offsets -> byte ends, for texts whose tokens do not spell them (module docstring)."""
    char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
    char_to_byte[1:] = np.cumsum(np.fromiter((len(c.encode()) for c in text), dtype=np.int64, count=len(text)))
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, len(text))
    starts, ends = char_to_byte[off[:, 0]], char_to_byte[off[:, 1]]
    out = ends.copy()
    k = 0
    while k < len(off):  # tokens sharing one character span split its bytes by their own byte lengths
        j = k + 1
        while j < len(off) and off[j, 0] == off[k, 0] and off[j, 1] == off[k, 1] and off[k, 1] > off[k, 0]:
            j += 1
        if j - k > 1:
            out[k:j] = np.minimum(starts[k] + np.cumsum(lens[k:j]), ends[k])
            out[j - 1] = ends[k]
        k = j
    out = np.maximum.accumulate(out)
    out[-1] = len(text.encode())
    return out
