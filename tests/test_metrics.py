"""The scoring functions at their edges, each against a computation written out independently."""

from __future__ import annotations

import numpy as np
import pytest

from eval_harness.metrics import (
    Bootstrap,
    counts_by,
    incremental_pass_at_k,
    incremental_resampled,
    pass_at_k,
    pass_at_k_matrix,
    resampled_means,
    resolve_ks,
)


def test_pass_at_k_rejects_impossible_counts_by_name():
    with pytest.raises(ValueError, match=r"correct samples \(4\) must be within \[0, n \(3\)\]"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match=r"correct samples \(-1\) must be within"):
        pass_at_k(3, -1, 1)
    assert pass_at_k(3, 3, 3) == pass_at_k(4, 2, 3) == 1.0 and pass_at_k(3, 0, 3) == 0.0


def test_resolve_ks_always_adds_n_and_never_zero():
    assert resolve_ks(None, 0) == [] and resolve_ks([1, 10], 0) == []
    assert resolve_ks([10], 1) == [1]  # n itself even when no asked k fits
    assert resolve_ks(None, 10) == [1, 10] and resolve_ks(None, 200) == [1, 10, 100, 200]
    assert resolve_ks([5, 0, -1, 5], 7) == [5, 7]
    assert pass_at_k_matrix([], [1, 10]).shape == (0, 2) and pass_at_k_matrix([], [1]).dtype == np.float64


def test_counts_by_task_id_by_default():
    rows = [{"task_id": "A", "status": "passed"}, {"task_id": "A", "status": "failed: x"},
            {"task_id": "B", "status": "timed out"}]
    assert counts_by(rows) == {"A": (2, 1), "B": (1, 0)}
    assert counts_by(rows, "status") == {"passed": (1, 1), "failed: x": (1, 0), "timed out": (1, 0)}


def test_incremental_groups_prompts_by_the_whole_task_id_and_empty_is_empty():
    rows = [{"task_id": "x#y#z", "prefix_lines": p, "status": "passed" if p else "failed"} for p in range(2)]
    rows += [{"task_id": "x#y", "prefix_lines": 0, "status": "passed"}]
    scores = incremental_pass_at_k(rows, [1])
    assert scores["micro"][1] == pytest.approx(2 / 3)
    assert scores["macro"][1] == pytest.approx((1 / 2 + 1) / 2)  # two problems, however '#' splits their ids
    neighbours = [{"task_id": "x#a", "prefix_lines": 0, "status": "failed"}]
    neighbours += [{"task_id": "x#b", "prefix_lines": p, "status": "passed"} for p in range(2)]
    assert incremental_pass_at_k(neighbours, [1])["macro"][1] == pytest.approx((0 + 1) / 2)  # not one problem 'x'
    assert incremental_pass_at_k([], [1, 10]) == {"micro": {}, "macro": {}}


def test_bootstrap_interval_is_the_two_and_a_half_and_ninety_seven_and_a_half_percentiles():
    stats = np.random.default_rng(0).random((1000, 3))  # (resamples, K)
    got = Bootstrap().interval(stats)
    assert got.shape == (3, 2)
    expected = np.stack([np.percentile(stats, 2.5, axis=0), np.percentile(stats, 97.5, axis=0)], 1)  # (K, 2)
    assert np.allclose(got, expected, rtol=0, atol=1e-12)
    assert np.allclose(Bootstrap(level=0.9).interval(stats)[:, 0], np.percentile(stats, 5, axis=0), rtol=0, atol=1e-12)
    draws = Bootstrap(resamples=7).draws(5, "row")
    assert draws.shape == (7, 5) and draws.min() >= 0 and draws.max() <= 4


def test_resampled_means_by_hand_and_with_no_problems():
    boot = Bootstrap(resamples=50)
    values = np.random.default_rng(1).random((6, 2))  # (problems, K)
    idx = boot.draws(6, "r")
    expected = np.array([[values[list(row), k].mean() for k in range(2)] for row in idx])
    assert np.allclose(resampled_means(values, boot, "r"), expected, rtol=0, atol=1e-15)
    assert np.array_equal(resampled_means(np.zeros((0, 3)), boot, "r"), np.zeros((50, 3)))


def test_incremental_resampled_by_hand():
    """Micro: every prompt of the drawn problems (a problem drawn twice counts twice); macro: per problem first."""
    boot = Bootstrap(resamples=40)
    rng = np.random.default_rng(2)
    prompts = [rng.random((m, 2)) for m in (1, 3, 2, 5)]  # per problem (prompts, K)
    micro, macro = incremental_resampled(prompts, boot, "inc")
    assert micro.shape == macro.shape == (40, 2)
    for row, (mi, ma) in zip(boot.draws(4, "inc"), zip(micro, macro)):
        drawn = [prompts[i] for i in row]
        assert np.allclose(mi, np.concatenate(drawn).mean(axis=0), rtol=0, atol=1e-12)
        assert np.allclose(ma, np.mean([p.mean(axis=0) for p in drawn], axis=0), rtol=0, atol=1e-12)
    assert not np.allclose(micro, macro)  # prompts per problem differ: the two averages differ
