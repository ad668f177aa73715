"""The project's code tokenizer: SentencePiece trained for source code, lossless on every accepted file.

Settings that matter for code, and why:
- identity normalisation, no whitespace collapsing, no dummy prefix: decoding gives back the exact bytes
  (tabs, trailing spaces, CRLF, non-ASCII);
- whitespace-only pieces: runs of indentation become single tokens;
- byte fallback: any character outside the vocabulary is spelled in bytes, never <unk>;
- split digits: numbers are read digit by digit, as in PanGu-Coder and LLaMA;
- whole files as training sentences, with ``max_sentence_length`` above the largest accepted file (the default
  4192 bytes silently drops longer inputs from training);
- language tags, ``<|endoftext|>`` and the PanGu-Coder markers as user-defined symbols (always one token).

SentencePiece shows spaces as U+2581 and so would decode a literal U+2581 in a file as a space; :meth:`encode`
spells that character with its byte pieces instead, which keeps the round trip exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from common.contracts import TokenizerRecord
from common.io import read_json_lines, write_bytes_atomic
from data_pipeline.languages import LANGUAGES, Language
from data_pipeline.markers import EOD, MARKERS, marker_symbols

log = logging.getLogger(__name__)

PAD = "<pad>"
META_SPACE = "\u2581"
_SEGMENT = re.compile(r" +[^ ]*|[^ ]+")


def special_symbols() -> list[str]:
    """Every user-defined symbol, in a fixed order (part of the tokenizer's identity)."""
    symbols = [EOD, *MARKERS]
    symbols += [lang.code_marker for lang in LANGUAGES]
    symbols += [_piece(lang.tag) for lang in LANGUAGES]
    return symbols


def _piece(text: str) -> str:
    """A symbol as SentencePiece stores it: spaces are matched after they become U+2581."""
    return text.replace(" ", META_SPACE)


def train_tokenizer(
    texts: Iterable[str], output_prefix: str | Path, vocab_size: int, model_type: str = "bpe",
    max_sentence_bytes: int = 1 << 21, num_threads: int = 2,
) -> Path:
    """Train on whole files; writes ``PREFIX.model`` and ``PREFIX.vocab``; returns the model's path."""
    import sentencepiece as spm

    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_bytes,
        character_coverage=0.9999,
        user_defined_symbols=special_symbols(),
        unk_id=0, pad_id=1, pad_piece=PAD, bos_id=-1, eos_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    path = out.with_name(out.name + ".model")
    write_bytes_atomic(path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    out.with_name(out.name + ".vocab").write_text(vocab, encoding="utf-8")
    return path


class CodeTokenizer:
    """A trained model: exact encode/decode, the special ids, and a fingerprint recorded in every store."""

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist (train one with `codegeex data tokenizer`)")
        proto = self.path.read_bytes()
        self.fingerprint = hashlib.sha256(proto).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = self._require(EOD)
        self.pad_id = self._require(PAD)
        self._meta_bytes = [self._require(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        self.token_dtype = np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)
        self._young: dict[str, bytes] = {}  # segment -> its ids as token_dtype bytes
        self._old: dict[str, bytes] = {}
        self._tags: dict[str, list[int]] = {}
        self.threads = -1  # SentencePiece threads for batched calls (-1: all cores; 1 inside worker pools)
        self.cache_entries = 100_000  # segments per generation (about 15 MB each at most)
        # texts a document may not hold: encoded, it would end the document in the middle
        self.reserved_texts: tuple[str, ...] = (EOD,)

    def _require(self, piece: str) -> int:
        pid = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(pid) != piece:
            raise ValueError(f"tokenizer model {self.path} has no {piece!r} piece; train it with `codegeex data tokenizer`")
        return int(pid)

    def piece_id(self, symbol: str) -> int:
        """The id of a special symbol (a marker or tag), which always encodes to exactly one token."""
        return self._require(_piece(symbol))

    def encode(self, text: str) -> list[int]:
        if META_SPACE not in text:
            return list(self.sp.encode(text))
        ids: list[int] = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                ids.extend(self._meta_bytes)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts: the same ids as :meth:`encode`, several times faster on code (see :meth:`encode_arrays`)."""
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts to arrays of ``token_dtype``; the same ids as :meth:`encode`.

        Each text is cut into segments at the start of every run of spaces (``" +[^ ]*|[^ ]+"``). No vocabulary
        piece crosses such a point (training splits words there), so encoding the segments one by one gives
        SentencePiece's own result. Segments repeat a lot in code (indentation plus a keyword, ``return``, ``}``):
        each distinct one is encoded once, in one batched SentencePiece call, and kept in a two-generation cache
        (recently used segments survive when it fills). Texts holding a space-containing symbol (a language tag)
        or U+2581 take the plain path.
        """
        if len(self._young) > self.cache_entries:
            self._old, self._young = self._young, {}
        young, old, dtype = self._young, self._old, self.token_dtype
        plain = {i for i, t in enumerate(texts) if META_SPACE in t or "language:" in t}
        found = [[] if i in plain else _SEGMENT.findall(t) for i, t in enumerate(texts)]
        need = set().union(*found) - young.keys()
        for seg in need & old.keys():
            young[seg] = old[seg]
        missing = list(need - young.keys())
        if missing:
            encoded = self.sp.encode(missing, num_threads=self.threads)
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            buf = np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum())).tobytes()
            ends = (np.cumsum(lengths) * dtype.itemsize).tolist()
            young.update(zip(missing, map(buf.__getitem__, map(slice, [0, *ends[:-1]], ends))))
        return [np.array(self.encode(t), dtype=dtype) if i in plain
                else np.frombuffer(b"".join(map(young.__getitem__, found[i])), dtype=dtype)
                for i, t in enumerate(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.sp.decode([int(i) for i in ids]))

    def tag_ids(self, lang: Language) -> list[int]:
        """The tokens of a document's first line: the language tag and its newline."""
        if lang.name not in self._tags:
            self._tags[lang.name] = [self.piece_id(lang.tag), *self.encode("\n")]
        return self._tags[lang.name]

    def pieces(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            yield self.sp.id_to_piece(int(i))


@runtime_checkable
class TextTokenizer(Protocol):
    """What every tokenizer kind offers: :class:`CodeTokenizer` (a SentencePiece ``.model`` file) and
    :class:`data_pipeline.bpe_tokenizer.CodeGeeXTokenizer` (a byte-level BPE directory)."""

    path: Path
    fingerprint: str  # sha256 of the tokenizer's file(s)
    vocab_size: int
    eod_id: int
    pad_id: int
    token_dtype: np.dtype

    threads: int  # 1: no threads of its own (inside worker pools); -1: all cores
    reserved_texts: tuple[str, ...]  # texts a document may not hold (special tokens' text: no lossless round trip)

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def piece_id(self, symbol: str) -> int: ...

    def tag_ids(self, lang: Language) -> list[int]: ...

    def pieces(self, ids: Iterable[int]) -> Iterator[str]: ...


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer ``path`` holds: a ``.model`` file is SentencePiece, a directory with ``vocab.json`` and
    ``merges.txt`` is CodeGeeX's byte-level BPE."""
    from data_pipeline.bpe_tokenizer import CodeGeeXTokenizer, is_bpe_dir

    p = Path(path)
    if p.is_file():
        return CodeTokenizer(p)
    if is_bpe_dir(p):
        return CodeGeeXTokenizer(p)
    if p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {p} has no vocab.json and merges.txt: give a SentencePiece "
                                ".model file or a byte-level BPE directory (vocab.json, merges.txt, added_tokens.json)")
    raise FileNotFoundError(f"tokenizer model {p} does not exist: give a SentencePiece .model file (train one with "
                            "`codegeex data tokenizer`) or a byte-level BPE directory (vocab.json, merges.txt, "
                            "added_tokens.json)")


def marker_ids(tokenizer: TextTokenizer) -> list[int]:
    """The ids of :func:`marker_symbols` (``[MASK]`` and PanGu-Coder's markers) in ``tokenizer``."""
    return [tokenizer.piece_id(symbol) for symbol in marker_symbols()]


def tokenizer_record(tokenizer: TextTokenizer) -> TokenizerRecord:
    """What a store or checkpoint records of ``tokenizer``: its path, fingerprint and ids (no [MASK] and no markers
    for a SentencePiece model trained before they existed)."""
    try:
        mask, markers = tokenizer.piece_id("[MASK]"), marker_ids(tokenizer)
    except ValueError:
        mask, markers = -1, []
    return TokenizerRecord(path=str(tokenizer.path), sha256=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                           eod_id=tokenizer.eod_id, pad_id=tokenizer.pad_id, eod=EOD,
                           token_dtype=tokenizer.token_dtype.name, mask_id=mask, marker_ids=markers)


def check_vocab_fits(tokenizer: TextTokenizer, padded_vocab_size: int) -> None:
    """Refuse a tokenizer whose ids do not all have a row in a model's (padded) embedding, naming both sizes."""
    if tokenizer.vocab_size > padded_vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} entries but the model's padded "
                         f"vocabulary has {padded_vocab_size} rows; ids {padded_vocab_size}..{tokenizer.vocab_size - 1} "
                         "would have no embedding")


def _texts(path: Path, batch: int) -> Iterator[list[str]]:
    """The ``text`` fields of a JSONL file, ``batch`` at a time; a bad line raises naming the file and line."""
    texts: list[str] = []
    for lineno, rec in read_json_lines(path):
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            got = type(text).__name__ if isinstance(rec, dict) and "text" in rec else "no 'text' field"
            raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field, got {got}")
        texts.append(text)
        if len(texts) == batch:
            yield texts
            texts = []
    if texts:
        yield texts


def encode_jsonl(tokenizer: str | Path, input_path: str | Path, output_path: str | Path,
                 batch: int = 4096) -> dict[str, int]:
    """``{"text": ...}`` lines in, ``{"text": ..., "ids": [...]}`` lines out (written whole or not at all);
    returns the counts of records and tokens."""
    tok = load_tokenizer(tokenizer)
    src, out = Path(input_path), Path(output_path)
    if not src.is_file():
        raise FileNotFoundError(f"input {src} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    records = tokens = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for texts in _texts(src, batch):
                encoded = tok.encode_batch(texts)
                fh.writelines(json.dumps({"text": t, "ids": ids}, ensure_ascii=False) + "\n"
                              for t, ids in zip(texts, encoded))
                records += len(texts)
                tokens += sum(map(len, encoded))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("encoded %d records (%d tokens) of %s with %s into %s", records, tokens, src, tok.path, out)
    return {"records": records, "tokens": tokens}
