"""The sampler: every window once per epoch across data-parallel ranks, exact resumption, blends."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from common.config import ConfigError, load_config
from data_pipeline.sampler import DataSampler, SamplerConfig, SamplerState
from data_pipeline.store import TokenStore
from tests.test_build import build


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
