"""CodeGeeX-13B's tokenizer: GPT-J's byte-level GPT-2 BPE plus 143 added tokens and CodeGeeX's whitespace rule.

The directory holds the files CodeGeeX released: ``vocab.json`` (50,257 entries, ``<|endoftext|>`` = 50256),
``merges.txt`` and ``added_tokens.json`` (``<|extratoken_1|>`` ... ``<|extratoken_143|>``, ids 50257-50399).
Before encoding, every run of n spaces, n from 10 down to 2, becomes ``<|extratoken_{n+8}|>`` (ids 50266-50274),
left to right as Python's ``str.replace`` does; decoding turns those tokens back into spaces.

Everything runs inside Hugging Face ``tokenizers`` (Rust): the whitespace rule is the normaliser (literal
``Replace`` steps, longest run first), the added tokens are matched on the normalised text, the BPE works on
GPT-2's byte-level pre-tokens, and the decoder is byte-level followed by the reverse replacements. Batches go
through ``encode_batch_fast`` (parallel, no offsets); the BPE keeps its own word cache, so no segment cache is
kept here.

One limit, shared with CodeGeeX: a text that literally contains ``<|extratoken_N|>`` (N = 10..18) decodes with
spaces in its place; ``<|endoftext|>`` in a text is encoded as the document end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EOD = "<|endoftext|>"
FILES = ("vocab.json", "merges.txt", "added_tokens.json")
START_EXTRA_ID = 10  # CodeGeeX's start_extra_id: a run of n spaces is <|extratoken_{START_EXTRA_ID + n - 2}|>
MAX_RUN = 10  # CodeGeeX's max_len: the longest run one token stands for


def whitespace_token(n: int) -> str:
    """The added token that stands for a run of ``n`` spaces (2 <= n <= 10)."""
    return f"<|extratoken_{START_EXTRA_ID + n - 2}|>"


def is_bpe_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a byte-level BPE (``vocab.json`` and ``merges.txt``)."""
    p = Path(path)
    return p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file()


def _added_tokens(path: Path, base_size: int) -> list[str]:
    """The added tokens in id order, checked to follow the base vocabulary without gaps."""
    file = path / "added_tokens.json"
    if not file.is_file():
        return []
    added: dict[str, int] = json.loads(file.read_text(encoding="utf-8"))
    ordered = sorted(added.items(), key=lambda kv: kv[1])
    for i, (token, tid) in enumerate(ordered):
        if tid != base_size + i:
            raise ValueError(f"{file}: {token!r} has id {tid}, expected {base_size + i} (added tokens must follow "
                             f"the {base_size} entries of vocab.json without gaps)")
    return [token for token, _ in ordered]


class CodeGeeXTokenizer:
    """A CodeGeeX tokenizer directory: exact encode/decode, the special ids, and a fingerprint of its files."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

        self.path = Path(path)
        if not is_bpe_dir(self.path):
            raise FileNotFoundError(f"tokenizer directory {self.path} does not hold vocab.json and merges.txt")
        digest = hashlib.sha256()
        for name in FILES:
            file = self.path / name
            if file.is_file():
                digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
        self.fingerprint = digest.hexdigest()
        tok = Tokenizer(models.BPE.from_file(str(self.path / "vocab.json"), str(self.path / "merges.txt")))
        base_size = tok.get_vocab_size()
        tok.normalizer = normalizers.Sequence(
            [normalizers.Replace(" " * n, whitespace_token(n)) for n in range(MAX_RUN, 1, -1)])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.Sequence(
            [decoders.ByteLevel(), *(decoders.Replace(whitespace_token(n), " " * n) for n in range(2, MAX_RUN + 1))])
        eod = tok.token_to_id(EOD)
        if eod is None:
            raise ValueError(f"{self.path / 'vocab.json'} has no {EOD!r} entry")
        tok.add_special_tokens([AddedToken(EOD, normalized=True)])
        tok.add_tokens([AddedToken(t, normalized=True) for t in _added_tokens(self.path, base_size)])
        for n in range(2, MAX_RUN + 1):
            if tok.token_to_id(whitespace_token(n)) is None:
                raise ValueError(f"{self.path / 'added_tokens.json'} has no {whitespace_token(n)!r} "
                                 f"(CodeGeeX's token for {n} spaces)")
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eod_id = int(eod)
        self.pad_id = self.eod_id  # CodeGeeX has no pad token; padding positions are masked out anyway
        self.token_dtype = np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)
        log.debug("tokenizer %s: %d entries (%d base), eod %d", self.path, self.vocab_size, base_size, self.eod_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel: the same ids as :meth:`encode`."""
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts to arrays of ``token_dtype``; the same ids as :meth:`encode`."""
        return [np.array(ids, dtype=self.token_dtype) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def piece_id(self, symbol: str) -> int:
        """The id of a token that is one entry (``<|endoftext|>``, an ``<|extratoken_N|>``)."""
        tid = self.tok.token_to_id(symbol)
        if tid is None:
            raise ValueError(f"tokenizer {self.path} has no {symbol!r} token")
        return int(tid)

    def pieces(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            yield str(self.tok.id_to_token(int(i)))
