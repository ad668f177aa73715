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

The pipeline's own markers (``[MASK]``, PanGu-Coder's ``[descr]``, ``[eoc]``, ..., and the code markers such as
``[python]``) stand for added tokens CodeGeeX never uses, ``<|extratoken_19|>`` (id 50275) to
``<|extratoken_48|>`` (id 50304), and decode as the marker's text. They are only ever inserted as ids: a text holding
``[MASK]`` is encoded as CodeGeeX encodes it.

One limit, shared with CodeGeeX: a text that literally contains ``<|extratoken_N|>`` decodes with spaces or a marker
in its place, and ``<|endoftext|>`` in a text is encoded as the document end; the build skips such documents
(``special_token_text``, :attr:`CodeGeeXTokenizer.reserved_texts`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from common.contracts import tokenizer_sha256
from data_pipeline.languages import Language
from data_pipeline.markers import EOD, marker_symbols

log = logging.getLogger(__name__)
# where encode_arrays may cut a text (zero-width): before a run of 2+ spaces; after a newline with non-space around
_CUT = re.compile(r"(?<=[^ ])(?=  )|(?<=[^\s]\n)(?=[^\s])")

START_EXTRA_ID = 10  # CodeGeeX's start_extra_id: a run of n spaces is <|extratoken_{START_EXTRA_ID + n - 2}|>
MAX_RUN = 10  # CodeGeeX's max_len: the longest run one token stands for
# PanGu-Coder's markers and the code markers ([MASK], [descr], [python], ...: data_pipeline.tokenizer.marker_symbols)
# take added tokens CodeGeeX leaves unused, from <|extratoken_19|> (id 50275) on: 30 of them, ids 50275-50304
FIRST_MARKER_EXTRA = 19
EXTRA = "<|extratoken_{}|>"


def whitespace_token(n: int) -> str:
    """The added token that stands for a run of ``n`` spaces (2 <= n <= 10)."""
    return EXTRA.format(START_EXTRA_ID + n - 2)


def marker_tokens() -> dict[str, str]:
    """Each pipeline marker (``[MASK]``, ``[descr]``, ``[python]``, ...) -> the added token that stands for it."""
    return {symbol: EXTRA.format(FIRST_MARKER_EXTRA + i) for i, symbol in enumerate(marker_symbols())}


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
        self.fingerprint = tokenizer_sha256(self.path)
        self.markers = marker_tokens()
        tok = Tokenizer(models.BPE.from_file(str(self.path / "vocab.json"), str(self.path / "merges.txt")))
        base_size = tok.get_vocab_size()
        tok.normalizer = normalizers.Sequence(
            [normalizers.Replace(" " * n, whitespace_token(n)) for n in range(MAX_RUN, 1, -1)])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.Sequence(
            [decoders.ByteLevel(), *(decoders.Replace(whitespace_token(n), " " * n) for n in range(2, MAX_RUN + 1)),
             *(decoders.Replace(token, symbol) for symbol, token in self.markers.items())])
        eod = tok.token_to_id(EOD)
        if eod is None:
            raise ValueError(f"{self.path / 'vocab.json'} has no {EOD!r} entry")
        tok.add_special_tokens([AddedToken(EOD, normalized=True)])
        tok.add_tokens([AddedToken(t, normalized=True) for t in _added_tokens(self.path, base_size)])
        for n in range(2, MAX_RUN + 1):
            if tok.token_to_id(whitespace_token(n)) is None:
                raise ValueError(f"{self.path / 'added_tokens.json'} has no {whitespace_token(n)!r} "
                                 f"(CodeGeeX's token for {n} spaces)")
        for symbol, token in self.markers.items():
            if tok.token_to_id(token) is None:
                raise ValueError(f"{self.path / 'added_tokens.json'} has no {token!r}, which stands for {symbol} "
                                 f"(the pipeline's markers take <|extratoken_{FIRST_MARKER_EXTRA}|> on)")
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eod_id = int(eod)
        self.pad_id = self.eod_id  # CodeGeeX has no pad token; padding positions are masked out anyway
        self.token_dtype = np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)
        # a document holding these would not come back from its ids: <|endoftext|> would end it, an added token's
        # text would decode as spaces or a marker
        self.reserved_texts: tuple[str, ...] = (EOD, "<|extratoken_")
        self._tags: dict[str, list[int]] = {}
        self._young: dict[str, bytes] = {}  # segment -> its ids as token_dtype bytes (encode_arrays)
        self._old: dict[str, bytes] = {}
        self.cache_entries = 100_000
        self._threads = -1
        log.debug("tokenizer %s: %d entries (%d base), eod %d", self.path, self.vocab_size, base_size, self.eod_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel: the same ids as :meth:`encode`."""
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    @property
    def threads(self) -> int:
        """-1: batches use tokenizers' thread pool (every core); 1: this thread only, for worker pools (set through
        ``TOKENIZERS_PARALLELISM``, which tokenizers reads at every batch, so it holds for this process)."""
        return self._threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._threads = n
        if n == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts to arrays of ``token_dtype``; the same ids as :meth:`encode`.

        Each text is cut into segments at points no token crosses (:data:`_CUT`): before every run of two or more
        spaces (the whitespace rule makes it an added token, and tokenizers encodes the text between added tokens
        piece by piece), and after a newline between two non-space characters (GPT-2's pre-tokenizer always makes
        such a newline a token of its own). Code repeats such segments (an indented line, ``}``): each distinct one
        is encoded once, in one batched call, and kept in a two-generation cache, as the SentencePiece encoder does.
        """
        if len(self._young) > self.cache_entries:
            self._old, self._young = self._young, {}
        young, old, dtype = self._young, self._old, self.token_dtype
        found = [_CUT.split(t) for t in texts]
        need = set().union(*found) - young.keys()
        for seg in need & old.keys():
            young[seg] = old[seg]
        missing = [seg for seg in need - young.keys() if seg]
        if missing:
            encoded = self.encode_batch(missing)
            young.update((seg, np.array(ids, dtype=dtype).tobytes()) for seg, ids in zip(missing, encoded))
        young[""] = b""
        return [np.frombuffer(b"".join(map(young.__getitem__, parts)), dtype=dtype) for parts in found]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def piece_id(self, symbol: str) -> int:
        """The id of a token that is one entry (``<|endoftext|>``, an ``<|extratoken_N|>``, a pipeline marker such as
        ``[MASK]``, which stands for its added token)."""
        tid = self.tok.token_to_id(self.markers.get(symbol, symbol))
        if tid is None:
            raise ValueError(f"tokenizer {self.path} has no {symbol!r} token")
        return int(tid)

    def tag_ids(self, lang: Language) -> list[int]:
        """The tokens of a document's first line, as CodeGeeX writes it: the tag's text and a newline."""
        if lang.name not in self._tags:
            self._tags[lang.name] = self.encode(lang.tag + "\n")
        return self._tags[lang.name]

    def pieces(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            yield str(self.tok.id_to_token(int(i)))
