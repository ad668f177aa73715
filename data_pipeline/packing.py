"""Packing documents into fixed windows of ``seq_len + 1`` tokens, keeping every document boundary.

Two modes:
- ``concat`` (Megatron's and CodeGeeX's): documents follow one another and are cut at window edges; only the
  last window of each language is padded.
- ``best_fit``: a document is never cut unless it is longer than a window; documents go to the first open
  window with room (first-fit over at most ``open_windows`` windows), which costs padding, reported.

Windows hold one language each (one packer per language), so the sampler can weight languages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Per-token modality of text-to-code pairs: bit flags (whole files are all code, 0).
TEXT = 1  # embedded by the docstring table under embedding separation (docstring text and the markers around it)
PREFIX = 2  # inside the bidirectional, loss-free prefix of PREFIX-CODE-CLM
CORRUPTIBLE = 4  # docstring text that CORRUPT-CODE-CLM may replace
MODALITY_CODE = 0
MODALITY_DOCSTRING = TEXT | PREFIX | CORRUPTIBLE  # 7
MODALITY_MARKUP = TEXT | PREFIX  # 3: the language tag, [sos], [descr], the code marker
MODALITY_SIGNATURE = PREFIX  # 2: the signature in the PyCodeGPT order (code, but part of the prefix)


@dataclass
class Window:
    """One packed sample: ``tokens[:num_tokens]`` are real, the rest padding."""

    tokens: np.ndarray  # (W,) token ids
    doc_starts: list[int]  # offsets in the window where a document starts (0 is always a segment start)
    num_tokens: int
    language: int
    modality: np.ndarray | None = None  # (W,) uint8, MODALITY_* per token, when the store keeps modality


def document_ids(doc_starts: np.ndarray | list[int], length: int) -> np.ndarray:
    """(length,) int32: the index of the document segment each position belongs to (0 for the first)."""
    ids = np.zeros(length, dtype=np.int32)
    starts = [s for s in doc_starts if 0 < s < length]
    ids[starts] = 1
    return np.cumsum(ids, dtype=np.int32)


def position_ids(doc_starts: np.ndarray | list[int], length: int) -> np.ndarray:
    """(length,) int32: positions restarting at 0 at the window start and at every document start."""
    pos = np.arange(length, dtype=np.int32)
    seg = document_ids(doc_starts, length)
    starts = np.concatenate([[0], [s for s in doc_starts if 0 < s < length]]).astype(np.int32)
    return pos - starts[seg]


@dataclass
class _Bin:
    tokens: list[np.ndarray] = field(default_factory=list)
    modality: list[np.ndarray] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    used: int = 0


class Packer:
    """Packs one language's documents; calls ``emit`` with every finished window, in a deterministic order."""

    def __init__(self, window: int, language: int, pad_id: int, emit: Callable[[Window], None],
                 mode: str = "concat", with_modality: bool = False, open_windows: int = 8) -> None:
        if mode not in ("concat", "best_fit"):
            raise ValueError(f"pack.mode {mode!r} must be 'concat' or 'best_fit'")
        self.window, self.language, self.pad_id, self.emit = window, language, pad_id, emit
        self.mode, self.with_modality, self.open_windows = mode, with_modality, open_windows
        self.bins: list[_Bin] = []
        self.windows = 0
        self.padding = 0

    def add(self, tokens: np.ndarray, modality: np.ndarray | None = None) -> None:
        if modality is None and self.with_modality:
            modality = np.full(len(tokens), MODALITY_CODE, dtype=np.uint8)
        if self.mode == "concat":
            self._add_concat(tokens, modality)
        else:
            self._add_best_fit(tokens, modality)

    def _put(self, b: _Bin, tokens: np.ndarray, modality: np.ndarray | None, new_doc: bool) -> None:
        if new_doc:
            b.starts.append(b.used)
        b.tokens.append(tokens)
        if modality is not None:
            b.modality.append(modality)
        b.used += len(tokens)

    def _add_concat(self, tokens: np.ndarray, modality: np.ndarray | None) -> None:
        pos, new_doc = 0, True
        while pos < len(tokens):
            if not self.bins:
                self.bins.append(_Bin())
            b = self.bins[0]
            take = min(self.window - b.used, len(tokens) - pos)
            self._put(b, tokens[pos:pos + take], None if modality is None else modality[pos:pos + take], new_doc)
            pos, new_doc = pos + take, False
            if b.used == self.window:
                self._emit(self.bins.pop(0))

    def _add_best_fit(self, tokens: np.ndarray, modality: np.ndarray | None) -> None:
        pos, new_doc = 0, True
        while len(tokens) - pos > self.window:  # longer than a window: full windows first
            b = _Bin()
            self._put(b, tokens[pos:pos + self.window], None if modality is None else modality[pos:pos + self.window],
                      new_doc)
            self._emit(b)
            pos, new_doc = pos + self.window, False
        rest, rest_mod = tokens[pos:], None if modality is None else modality[pos:]
        for b in self.bins:
            if self.window - b.used >= len(rest):
                # every open window holds tokens already, so what lands here starts a segment (a cut document's
                # tail too)
                self._put(b, rest, rest_mod, True)
                return
        if len(self.bins) >= self.open_windows:  # close the fullest (the oldest among equals)
            fullest = max(range(len(self.bins)), key=lambda i: (self.bins[i].used, -i))
            self._emit(self.bins.pop(fullest))
        b = _Bin()
        self._put(b, rest, rest_mod, new_doc)
        self.bins.append(b)

    def _emit(self, b: _Bin) -> None:
        tokens = np.full(self.window, self.pad_id, dtype=np.int64)
        tokens[:b.used] = np.concatenate(b.tokens)  # a window is emitted only once it holds tokens
        mod = None
        if self.with_modality:
            mod = np.full(self.window, MODALITY_CODE, dtype=np.uint8)
            mod[:b.used] = np.concatenate(b.modality)
        self.windows += 1
        self.padding += self.window - b.used
        self.emit(Window(tokens, b.starts, b.used, self.language, mod))

    def flush(self) -> None:
        """Emit the windows still open (padded)."""
        for b in self.bins:
            if b.used:
                self._emit(b)
        self.bins = []
