"""Exact and near deduplication: content hashes and MinHash LSH, decided globally in input order.

Parameters (StarCoder's, the defaults of :class:`DedupConfig`): 256 permutations over word 5-gram shingles,
LSH with 32 bands of 8 rows (so pairs with Jaccard above ~0.65 become candidates), and a candidate is a duplicate
when its estimated Jaccard similarity (the share of equal MinHash values) is at least 0.7.

The per-document work (hashes, signatures, band keys) runs in the workers; the decision runs once over all
documents in their input order and keeps the first document of every duplicate group, so the result does not
depend on the number of workers. It holds one band's keys at a time (12 bytes a document), not a dictionary of
every band: memory stays small as the corpus grows.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.config import option

_WORD = re.compile(r"\w+", re.UNICODE)
_MASK32 = np.uint64(0xFFFFFFFF)


@dataclass
class DedupConfig:
    """Exact and near deduplication."""

    exact: bool = option(True, "drop documents whose content hash equals an earlier document's")
    near: bool = option(True, "drop documents that are near-duplicates (MinHash LSH) of an earlier document")
    num_perm: int = option(256, "MinHash permutations")
    ngram: int = option(5, "shingle size in words")
    bands: int = option(32, "LSH bands; rows per band = num_perm / bands")
    threshold: float = option(0.7, "estimated Jaccard similarity at or above which a candidate is a duplicate")
    seed: int = option(42, "seed of the MinHash permutations (part of the store's identity)")

    def validate(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.num_perm ({self.num_perm}) must be a multiple of dedup.bands ({self.bands})")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold ({self.threshold}) must be in (0, 1]")
        if self.ngram < 1:
            raise ValueError(f"dedup.ngram ({self.ngram}) must be at least 1")


def content_hash(text: str) -> int:
    """A 64-bit hash of the exact content."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def hashed_ngrams(tokens: list[str], n: int, shorter_ok: bool = False) -> np.ndarray:
    """32-bit hashes (as uint64) of every run of ``n`` consecutive tokens; (len - n + 1,).

    A text shorter than ``n`` tokens gives one hash of all its tokens when ``shorter_ok``, none otherwise.
    """
    if len(tokens) < n:
        if not shorter_ok or not tokens:
            return np.zeros(0, dtype=np.uint64)
        n = len(tokens)
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokens), dtype=np.int64, count=len(tokens))
    tok_hash = np.fromiter((zlib.crc32(t.encode()) for t in vocab), dtype=np.uint64, count=len(vocab))[ids]
    count = len(tokens) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # polynomial combination of n consecutive token hashes, mod 2^64
            h = h * np.uint64(1_000_003) + tok_hash[j : count + j]
    return (h ^ (h >> np.uint64(29))) & _MASK32


class MinHasher:
    """MinHash signatures by multiply-shift hashing of 32-bit shingle hashes, vectorised over permutations."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.a = rng.integers(1, 2**63, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
        self.rows = cfg.num_perm // cfg.bands

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the word n-grams; (S,) uint64."""
        h = hashed_ngrams(_WORD.findall(text), self.cfg.ngram, shorter_ok=True)
        return np.unique(h) if len(h) else np.zeros(1, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32: the minimum of every permutation over the shingles."""
        sh = self.shingles(text)
        sig = np.full(self.cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(sh), 4096):  # bound the (S, P) temporary
            block = sh[start : start + 4096, None]  # (S', 1)
            with np.errstate(over="ignore"):
                perm = (self.a[None, :] * block + self.b[None, :]) >> np.uint64(32)  # (S', P)
            np.minimum(sig, perm.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(bands,) uint32: one hash per band of ``rows`` signature values."""
        rows = sig.reshape(self.cfg.bands, self.rows).astype(np.uint64)  # (B, R)
        h = np.zeros(self.cfg.bands, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for r in range(self.rows):
                h = (h + rows[:, r]) * np.uint64(0x9E3779B97F4A7C15)
        return ((h >> np.uint64(32)) & _MASK32).astype(np.uint32)


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """For each position, the index of the first position holding the same key; (N,) int64."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = order[np.flatnonzero(starts)]  # stable sort: the first member is the earliest
    group_id = np.cumsum(starts) - 1
    first = np.empty(len(keys), dtype=np.int64)
    first[order] = group_first[group_id]
    return first


def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """(N,) bool: True where an earlier document has the same content hash."""
    return first_occurrence(hashes) != np.arange(len(hashes))


def near_duplicates(
    band_column: Callable[[int], np.ndarray], num_bands: int, signature: Callable[[int], np.ndarray],
    threshold: float, skip: np.ndarray,
) -> np.ndarray:
    """(N,) bool: True where an earlier document shares an LSH band and has estimated Jaccard >= threshold.

    ``band_column(b)`` gives every document's key for band b; ``signature(i)`` one document's MinHash signature;
    documents in ``skip`` (exact duplicates) are neither candidates nor references.
    """
    n = len(skip)
    candidates: dict[int, set[int]] = {}
    live = np.flatnonzero(~skip)
    for b in range(num_bands):
        keys = band_column(b)[live]
        first = live[first_occurrence(keys)]
        for doc, ref in zip(live[first != live], first[first != live]):
            candidates.setdefault(int(doc), set()).add(int(ref))
    dup = np.zeros(n, dtype=bool)
    for doc in sorted(candidates):
        sig = signature(doc)
        for ref in sorted(candidates[doc]):
            if float(np.mean(signature(ref) == sig)) >= threshold:
                dup[doc] = True
                break
    return dup
