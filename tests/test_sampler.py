"""The sampler: every window once per epoch across data-parallel ranks, exact resumption, blends."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from common.config import ConfigError, load_config
from data_pipeline.packing import position_ids
from data_pipeline.sampler import DataSampler, SamplerConfig, SamplerState
from data_pipeline.store import StoreError, TokenStore
from tests.test_build import build, corrupt_copy


@pytest.fixture(scope="module")
def store_path(corpus, tokenizer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler") / "s"
    build(corpus[0], tokenizer_model, out, "pack.shard_mb=0.003")
    return str(out)


def cfg(path, gbs=4, seed=7, **extra):
    values = {"sources": [{"path": path, **extra}], "global_batch_size": gbs, "seed": seed}
    return load_config(SamplerConfig, values=values)


def test_every_window_exactly_once_per_epoch_across_ranks(store_path):
    n = len(TokenStore(store_path))
    gbs, dp = 4, 2
    samplers = [DataSampler(cfg(store_path, gbs), r, dp) for r in range(dp)]
    steps = n // gbs
    seen = [[i for _ in range(steps) for _, i in s.next_indices()] for s in samplers]
    assert set(seen[0]).isdisjoint(seen[1])
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == steps * gbs
    # the global order is the same whatever the number of ranks
    single = DataSampler(cfg(store_path, gbs), 0, 1)
    order = [i for _ in range(steps) for _, i in single.next_indices()]
    assert order == [x for k in range(steps) for r in range(dp) for x in seen[r][k * 2:(k + 1) * 2]]
    # next epoch: a different permutation of the same windows
    nxt = [i for _ in range(steps) for _, i in single.next_indices()]
    assert nxt != order[: len(nxt)]


def test_resume_gives_exactly_the_uninterrupted_sequence(store_path):
    straight = DataSampler(cfg(store_path), 1, 2)
    batches = [straight.next_batch() for _ in range(10)]
    first = DataSampler(cfg(store_path), 1, 2)
    for _ in range(4):
        first.next_batch()
    state = SamplerState.from_dict(first.state_dict())
    assert state.consumed_samples == 16
    resumed = DataSampler(cfg(store_path), 1, 2, state)
    for expected in batches[4:]:
        got = resumed.next_batch()
        for key in expected:
            assert np.array_equal(got[key], expected[key]), key


def test_resume_on_another_data_parallel_size_continues_the_global_order(store_path):
    """DP=2 for 3 batches, DP=1 for 2, DP=4 past the end of an epoch: the global batches, joined over the ranks
    of each leg, are the single-process order; no sample repeated or skipped within an epoch."""
    n = len(TokenStore(store_path))
    gbs = 4
    single = DataSampler(cfg(store_path, gbs), 0, 1)
    steps = n // gbs + 2  # into the second epoch
    order = [single.next_indices() for _ in range(steps)]
    got: list[list[tuple[int, int]]] = []
    state = None
    for dp, count in ((2, 3), (1, 2), (4, steps - 5)):
        ranks = [DataSampler(cfg(store_path, gbs), r, dp, SamplerState.from_dict(state) if state else None)
                 for r in range(dp)]
        for _ in range(count):
            got.append([pick for s in ranks for pick in s.next_indices()])
        assert len({json.dumps(s.state_dict()) for s in ranks}) == 1  # every rank holds the same state
        state = ranks[0].state_dict()
    assert got == order
    first_epoch = [i for batch in got[: n // gbs] for _, i in batch]
    assert len(first_epoch) == len(set(first_epoch)) == (n // gbs) * gbs
    assert state["consumed_samples"] == steps * gbs


def test_batch_arrays(store_path):
    b = DataSampler(cfg(store_path, 4), 0, 1).next_batch()
    assert b["tokens"].shape == (4, 65) and b["tokens"].dtype == np.int64
    assert b["position_ids"].shape == b["document_ids"].shape == (4, 65)
    for row in range(4):
        starts = np.flatnonzero(b["position_ids"][row] == 0)
        assert starts[0] == 0 and np.all(np.diff(b["document_ids"][row])[starts[1:] - 1] == 1)


def test_blend_weights_upsample_a_language(store_path):
    store = TokenStore(store_path)
    counts = Counter(store.languages.tolist())
    py = [k for k in counts if k == 6][0]  # Python's registry id
    sources = [{"path": store_path, "languages": ["Python"], "weight": 3.0},
               {"path": store_path, "languages": ["Java", "JavaScript", "Go", "C++", "CSS", "Shell"]}]
    c = load_config(SamplerConfig, values={"sources": sources, "global_batch_size": 10})
    s = DataSampler(c)
    drawn = Counter(src for _ in range(50) for src, _ in s.next_indices())
    n_py, n_other = counts[py], sum(v for k, v in counts.items() if k != py)
    expected = 3 * n_py / (3 * n_py + n_other)
    assert abs(drawn[0] / 500 - expected) < 0.01
    assert s.state.source_counts == [drawn[0], drawn[1]]


def test_errors_name_the_values(store_path):
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be a multiple of the data-parallel size \(4\)"):
        DataSampler(cfg(store_path, 6), 0, 4)
    with pytest.raises(ConfigError, match=r"weight \(0.0\) must be positive"):
        cfg(store_path, weight=0)
    with pytest.raises(ValueError, match=r"state seed \(1\) differs from the config's seed \(7\)"):
        DataSampler(cfg(store_path), 0, 1, SamplerState(1, 0, [0]))


def _epochs(stream, n):
    """The stream cut into epochs of n draws (the last one possibly partial)."""
    return [stream[e:e + n] for e in range(0, len(stream), n)]


def test_a_remainder_batch_crosses_the_epoch_boundary_losing_and_repeating_nothing(store_path):
    """The global batch does not divide the store: the batch across each epoch boundary holds the last windows of
    one epoch and the first of the next; every epoch of the global stream is a permutation of all the windows."""
    n = len(TokenStore(store_path))
    gbs = next(g for g in (8, 12, 10) if n % g)
    steps = -(-3 * n // gbs) + 1  # past the end of the third epoch
    ranks = [DataSampler(cfg(store_path, gbs), r, 2) for r in range(2)]
    stream = [i for _ in range(steps) for s in ranks for _, i in s.next_indices()]
    single = DataSampler(cfg(store_path, gbs), 0, 1)
    assert [i for _ in range(steps) for _, i in single.next_indices()] == stream  # ranks joined: the global order
    epochs = _epochs(stream, n)
    for e in epochs[:3]:
        assert sorted(e) == list(range(n))  # once per epoch: none lost in the remainder, none repeated
    assert len(set(epochs[3])) == len(epochs[3])
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch its own permutation
    again = DataSampler(cfg(store_path, gbs), 0, 1)
    assert [i for _ in range(steps) for _, i in again.next_indices()] == stream  # deterministic
    # resumed after the last whole batch of the first epoch: the next batch straddles the boundary, as straight
    first = DataSampler(cfg(store_path, gbs), 0, 1)
    for _ in range(n // gbs):
        first.next_indices()
    resumed = DataSampler(cfg(store_path, gbs), 0, 1, SamplerState.from_dict(json.loads(json.dumps(first.state_dict()))))
    assert [i for _ in range(steps - n // gbs) for _, i in resumed.next_indices()] == stream[n // gbs * gbs:]


def test_a_blend_across_the_smaller_sources_epochs(store_path):
    """Python (most windows, weight 1) against the other languages (few windows, weight 2), over several epochs
    of both: proportions, per-source epoch permutations, mid-epoch resumption and data-parallel ranks, each
    checked against what the store's language column says."""
    languages = TokenStore(store_path).languages
    others = ["Java", "JavaScript", "Go", "C++", "CSS", "Shell"]
    from data_pipeline.languages import get_language

    windows = [np.flatnonzero(languages == get_language("Python").id),
               np.flatnonzero(np.isin(languages, [get_language(x).id for x in others]))]
    weights = [1.0, 2.0]
    n = [len(w) for w in windows]
    assert n[1] < n[0] and n[1] > 1
    shares = [k * w / sum(k * w for k, w in zip(n, weights)) for k, w in zip(n, weights)]
    gbs, dp = 9, 3
    sources = [{"path": store_path, "languages": ["Python"], "weight": weights[0]},
               {"path": store_path, "languages": others, "weight": weights[1]}]
    blend = lambda state=None, rank=0, size=1: DataSampler(  # noqa: E731
        load_config(SamplerConfig, values={"sources": sources, "global_batch_size": gbs, "seed": 11}), rank, size,
        state)
    steps = -(-4 * n[0] // int(gbs * shares[0]))  # about four epochs of Python, many of the other source
    single = blend()
    order = [pick for _ in range(steps) for pick in single.next_indices()]
    counts = np.cumsum([[src == 0, src == 1] for src, _ in order], axis=0)
    expected = np.arange(1, len(order) + 1)[:, None] * np.array(shares)
    # two sources: the largest-deficit rule keeps each count within half a sample of its share at every point (it
    # rounds the share to the nearest count)
    assert np.abs(counts - expected).max() <= 0.5 + 1e-9
    for i in (0, 1):
        drawn = [idx for src, idx in order if src == i]
        assert len(drawn) > 3 * n[i]
        for e in _epochs(drawn, n[i]):
            assert set(e) <= set(windows[i].tolist()) and len(set(e)) == len(e)  # this source's windows only
            assert len(e) < n[i] or sorted(e) == sorted(windows[i].tolist())  # each whole epoch a permutation
    # resumed mid-epoch of both sources: exactly the straight run
    cut = next(k for k in range(steps // 2, steps) if all(c % m for c, m in zip(counts[k * gbs - 1], n)))
    first = blend()
    for _ in range(cut):
        first.next_indices()
    assert first.state.source_counts == counts[cut * gbs - 1].tolist()
    resumed = blend(SamplerState.from_dict(json.loads(json.dumps(first.state_dict()))))
    assert [p for _ in range(steps - cut) for p in resumed.next_indices()] == order[cut * gbs:]
    # the data-parallel ranks' slices, joined batch by batch, are the single-rank order
    ranks = [blend(None, r, dp) for r in range(dp)]
    assert [p for _ in range(steps) for s in ranks for p in s.next_indices()] == order


def test_batch_keys_match_the_store_rows(store_path):
    """Every array of a batch against the store rows its sample_keys name."""
    s = DataSampler(cfg(store_path, 4), 1, 2)
    store = TokenStore(store_path)
    b = s.next_batch()
    assert b["sample_keys"].shape == (2, 2) and b["sample_keys"].dtype == np.int64
    assert set(b) == {"tokens", "position_ids", "document_ids", "num_tokens", "sample_keys"}  # no modality column
    for row, (src, idx) in enumerate(b["sample_keys"].tolist()):
        sample = store[idx]
        assert src == 0 and np.array_equal(b["tokens"][row], sample.tokens)
        assert b["num_tokens"][row] == sample.num_tokens and b["num_tokens"].dtype == np.int32
        assert np.array_equal(b["position_ids"][row], position_ids(sample.doc_starts, s.window))
    assert s.window == store.window == 65


def test_resumed_directly_into_the_second_epoch(store_path):
    n = len(TokenStore(store_path))
    gbs = 4
    straight = DataSampler(cfg(store_path, gbs), 0, 1)
    order = [straight.next_indices() for _ in range(n // gbs + 4)]
    state = SamplerState(7, (n // gbs + 2) * gbs, [(n // gbs + 2) * gbs])  # already past the epoch boundary
    resumed = DataSampler(cfg(store_path, gbs), 0, 1, state)
    assert [resumed.next_indices() for _ in range(2)] == order[n // gbs + 2:]


def test_more_errors_name_the_values(store_path, corpus, tokenizer_model, tmp_path):
    with pytest.raises(ConfigError, match=r"sources\[\]\.path: give the token store directory$"):
        load_config(SamplerConfig, values={"sources": [{"weight": 1.0}]})
    with pytest.raises(ConfigError, match="sources: give at least one token store$"):
        load_config(SamplerConfig, values={"sources": []})
    with pytest.raises(ConfigError, match=r"global_batch_size \(0\) must be at least 1"):
        cfg(store_path, 0)
    assert cfg(store_path, 1).global_batch_size == 1
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, dp_size \(2\)\)"):
        DataSampler(cfg(store_path, 4), 2, 2)
    with pytest.raises(ValueError, match="sampler state has 2 source counts, config has 1 sources"):
        DataSampler(cfg(store_path), 0, 1, SamplerState(7, 0, [0, 0]))
    with pytest.raises(StoreError, match=r"no windows of languages \['Rust'\]"):
        DataSampler(cfg(store_path, languages=["Rust"]))
    assert len(DataSampler(cfg(store_path, languages=["Python"])).sources[0].windows) >= 1
    short = tmp_path / "short"
    build(corpus[0], tokenizer_model, short, "pack.seq_len=32")
    two = load_config(SamplerConfig, values={"sources": [{"path": store_path}, {"path": str(short)}]})
    with pytest.raises(StoreError, match=r"stores of different window sizes \[33, 65\] cannot be blended"):
        DataSampler(two)


def test_a_corrupted_shard_is_refused_unless_checksums_are_off(store_path, tmp_path):
    copy = tmp_path / "c"
    shard, _ = corrupt_copy(store_path, copy)
    with pytest.raises(StoreError, match=rf"{shard.name}: checksum mismatch"):
        DataSampler(cfg(str(copy)))  # verify_checksums defaults to true
    assert DataSampler(load_config(SamplerConfig, values={"sources": [{"path": str(copy)}],
                                                          "verify_checksums": False})).window == 65
