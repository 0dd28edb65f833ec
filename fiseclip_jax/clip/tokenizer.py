"""OpenAI CLIP byte-level BPE tokenizer (SPEC §1, "Text").

`tokenize(texts)` gives int32 ids of shape [N, context_length]: start token
49406, the BPE ids, end token 49407, then zeros (OpenAI padding). The text
tower reads its feature at `argmax(ids)`, which is the end token.

Text cleanup follows OpenAI CLIP: `ftfy.fix_text` *only if ftfy is
importable* (it is not a dependency; without it we apply only its NFC
normalisation, not its other repairs such as uncurling quotes), then
html-unescape twice, collapse whitespace, lower-case.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

try:  # optional: OpenAI applies it, but it only repairs mojibake
    import ftfy
except ImportError:
    ftfy = None

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77
# Context lengths the text tower is run at (`trim_context`): few, so it compiles rarely.
CONTEXT_BUCKETS = (8, 16, 24, 32, 48, 64, 77)
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# 49152 tokens = 256 bytes + 256 bytes+"</w>" + merges + 2 special tokens.
NUM_MERGES = 49152 - 256 - 2

# Special tokens, contractions, letter runs, single digits, other symbol runs.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode char, so BPE never sees raw
    whitespace/control bytes. Printable latin-1 bytes map to themselves; the
    rest are shifted to code points 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _load_merges() -> list[tuple[str, str]]:
    ref = importlib.resources.files("fiseclip_jax.clip").joinpath(VOCAB_FILE)
    with ref.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    # Line 0 is a "#version" header; the standard recipe keeps NUM_MERGES lines after it.
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


def _clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    else:  # fix_text ends with NFC; without it "e"+U+0301 would tokenise unlike "é"
        text = unicodedata.normalize("NFC", text)
    # Twice, as OpenAI does, for doubly escaped text such as "&amp;amp;".
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE: text -> token ids (no start/end). Use `get_tokenizer()`."""

    def __init__(self):
        self.byte_encoder = bytes_to_unicode()
        merges = _load_merges()
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        # Special tokens are whole words: never split them.
        self._cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        assert self.encoder[SOT_TOKEN] == SOT_ID and self.encoder[EOT_TOKEN] == EOT_ID

    def bpe(self, word: str) -> str:
        """Merge one pre-token (already byte-mapped) into space-separated BPE symbols."""
        if word in self._cache:
            return self._cache[word]
        # "</w>" marks the word end, so "cat" at a word end differs from "cat" inside a word.
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:])
            best = min(pairs, key=lambda p: self.merge_ranks.get(p, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out = " ".join(symbols)
        self._cache[word] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start/end tokens."""
        ids = []
        for piece in _PATTERN.findall(_clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of `encode` up to cleanup: word ends become spaces."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer, built on first use (reading the vocab takes ~0.5 s)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Ids [N, context_length] int32: start, BPE ids, end, zero padding.

    A text too long is truncated keeping the end token last, so `argmax(ids)`
    still finds it. A single string gives N = 1.
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [SOT_ID, *tok.encode(text)][: context_length - 1] + [EOT_ID]
        out[row, : len(ids)] = ids
    return out


def trim_context(ids: np.ndarray, buckets: Sequence[int] = CONTEXT_BUCKETS) -> np.ndarray:
    """Ids [N, T] cut to [N, T'], T' the smallest bucket (or T) holding every end token.

    Exact for CLIP's text tower: under its causal mask the feature at the end token
    never sees a later position, so the cut-off padding changes nothing (SPEC §1, "Text").
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [N, T], got {ids.shape}")
    if not len(ids):
        return ids
    longest = int(ids.argmax(-1).max()) + 1  # the end token has the largest id
    width = min((b for b in buckets if b >= longest), default=ids.shape[1])
    return ids[:, : min(width, ids.shape[1])]
