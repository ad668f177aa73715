"""Packing: every token kept in order, boundaries exact, positions and document ids reset per document."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.packing import Packer, document_ids, position_ids


def _docs(seed=0, n=40, longest=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 1000, size=int(rng.integers(1, longest))) for _ in range(n)]


def _pack(docs, mode, window=16, modality=False):
    out = []
    p = Packer(window, 3, 0, out.append, mode, with_modality=modality, open_windows=4)
    for i, d in enumerate(docs):
        p.add(d, np.full(len(d), i % 2, dtype=np.uint8) if modality else None)
    p.flush()
    return out, p


def test_concat_keeps_every_token_in_order_and_marks_starts():
    docs = _docs()
    windows, p = _pack(docs, "concat")
    assert all(len(w.tokens) == 16 and w.language == 3 for w in windows)
    assert all(w.num_tokens == 16 for w in windows[:-1])  # only the last window is padded
    stream = np.concatenate([w.tokens[:w.num_tokens] for w in windows])
    assert np.array_equal(stream, np.concatenate(docs))
    starts = [i * 16 + s for i, w in enumerate(windows) for s in w.doc_starts]
    assert starts == list(np.cumsum([0] + [len(d) for d in docs[:-1]]))
    assert p.padding == 16 * len(windows) - sum(len(d) for d in docs)


def test_best_fit_never_cuts_a_document_that_fits():
    docs = _docs(1, longest=40)
    windows, p = _pack(docs, "best_fit", modality=True)
    pieces = []
    for w in windows:
        cuts = sorted({0, *w.doc_starts, w.num_tokens})
        for a, b in zip(cuts, cuts[1:]):
            pieces.append(w.tokens[a:b].tolist())
        assert np.all(w.tokens[w.num_tokens:] == 0)
    short = [d.tolist() for d in docs if len(d) <= 16]
    for d in short:
        assert d in pieces  # whole, in one window
    assert sum(w.num_tokens for w in windows) == sum(len(d) for d in docs)
    assert p.padding > 0


def test_modality_travels_with_tokens():
    docs = _docs(2)
    windows, _ = _pack(docs, "concat", modality=True)
    mod = np.concatenate([w.modality[:w.num_tokens] for w in windows])
    assert np.array_equal(mod, np.concatenate([np.full(len(d), i % 2) for i, d in enumerate(docs)]))


def test_position_and_document_ids():
    assert position_ids([0, 3, 5], 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert document_ids([0, 3, 5], 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert position_ids([4], 6).tolist() == [0, 1, 2, 3, 0, 1]  # a window that starts mid-document
    assert document_ids([], 3).tolist() == [0, 0, 0]


def test_bad_mode():
    with pytest.raises(ValueError, match="pack.mode 'greedy'"):
        Packer(8, 0, 0, print, "greedy")
