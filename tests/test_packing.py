"""Packing: every token kept in order, boundaries exact, positions and document ids reset per document."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.packing import MODALITY_DOCSTRING, Packer, Window, document_ids, position_ids
from data_pipeline.sampler import collate


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


def _doc(i, n):
    return np.arange(n, dtype=np.int64) + 100 * (i + 1)


def test_best_fit_by_hand_exact_fits_closing_the_fullest_and_cut_tails():
    """Window 8, two open windows; every window's tokens, starts and emission order written out."""
    out = []
    p = Packer(8, 5, 0, out.append, "best_fit", open_windows=2)
    lengths = [5, 3, 8, 1, 19, 2]
    for i, n in enumerate(lengths):
        p.add(_doc(i, n))
    p.flush()
    p.flush()  # flushing again emits nothing
    d = [_doc(i, n).tolist() for i, n in enumerate(lengths)]
    expected = [
        (d[0] + d[1], [0, 5]),  # d1 fills d0's window exactly; closed first: as full as d2's and older
        (d[4][:8], [0]),  # a document longer than a window: whole windows first, emitted at once ...
        (d[4][8:16], []),  # ... the second one continues it (no start)
        (d[2], [0]),  # exactly one window: not cut
        (d[3] + d[4][16:] + d[5] + [0, 0], [0, 1, 4]),  # the tail is a segment of its own, at offset 1
    ]
    got = [(w.tokens.tolist(), w.doc_starts) for w in out]
    assert got == [(t + [0] * (8 - len(t)), s) for t, s in expected]
    assert [w.num_tokens for w in out] == [8, 8, 8, 8, 6]
    assert all(w.language == 5 and w.modality is None for w in out)
    assert p.windows == 5 and p.padding == 2


def test_best_fit_padding_is_the_sum_over_windows_and_modality_defaults_to_code():
    docs = _docs(3, n=60, longest=20)
    windows, p = _pack(docs, "best_fit", window=16)
    assert p.padding == sum(16 - w.num_tokens for w in windows) > 16
    assert all(w.modality is None for w in windows)
    out = []
    q = Packer(16, 0, 0, out.append, "best_fit", with_modality=True)
    for d in docs:
        q.add(d)  # no modality given: all code
    q.flush()
    assert all(w.modality.dtype == np.uint8 and not w.modality.any() for w in out)
    assert sum(w.num_tokens for w in out) == sum(len(d) for d in docs)


def test_defaults_are_concat_without_modality_over_eight_open_windows():
    out = []
    p = Packer(4, 0, 9, out.append)
    assert (p.mode, p.with_modality, p.open_windows) == ("concat", False, 8)
    p.add(np.arange(6))
    p.flush()
    assert [w.tokens.tolist() for w in out] == [[0, 1, 2, 3], [4, 5, 9, 9]]
    assert [w.modality for w in out] == [None, None]


def test_ids_at_the_edges_of_a_window():
    assert document_ids([0, 1, 2], 4).tolist() == [0, 1, 2, 2]  # one-token documents
    assert position_ids([0, 1, 2], 4).tolist() == [0, 0, 0, 1]
    # a start at the window's end (an empty document after a full window) is no segment
    assert document_ids([0, 2, 4], 4).tolist() == [0, 0, 1, 1]
    assert position_ids([0, 2, 4], 4).tolist() == [0, 1, 0, 1]
    assert position_ids([0, 2], 4).dtype == document_ids([0, 2], 4).dtype == np.int32  # what collate promises


def test_collate_stacks_modality_when_the_store_keeps_it():
    w = [Window(np.arange(6) + i, [0, 2 + i], 6 - i, 1, np.full(6, MODALITY_DOCSTRING, dtype=np.uint8))
         for i in range(2)]
    one = collate(w[:1])
    assert set(one) == {"tokens", "position_ids", "document_ids", "num_tokens", "modality"}
    both = collate(w)
    assert both["modality"].shape == (2, 6) and both["modality"].dtype == np.uint8
    assert np.array_equal(both["modality"], np.stack([x.modality for x in w]))
    assert both["num_tokens"].tolist() == [6, 5]
    assert both["document_ids"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
