"""Tensor parallelism on 4 gloo ranks against the single-process model: TP=2 and TP=4 equal TP=1.

One spawn checks, for TP in (2, 4): logits, loss and every gathered gradient; a checkpoint saved at TP=2 loading at
TP=4 and at TP=1 (in the parent); greedy generation with a KV cache under TP=2 equal to TP=1's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

# tolerance: fp32 on CPU, sums reordered by the tensor-parallel all-reduces
TOL = dict(rtol=2e-5, atol=2e-6)


def _gather(t: torch.Tensor, dim: int | None, pc) -> torch.Tensor:
    """The full tensor of a tensor-parallel parameter's piece (or its gradient's), on every TP rank."""
    import torch.distributed as dist

    if dim is None or pc.tp_size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(pc.tp_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=pc.tp_group)
    return torch.cat(parts, dim=dim)


def run_step(pc, ckpt_dir: str | None = None, load_from: str | None = None) -> dict[str, np.ndarray]:
    """Build the tiny model (seed 0), one forward/backward on the packed batch; full logits, loss and gradients."""
    import torch.distributed as dist

    from megatron_code.checkpoint import load_checkpoint, save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import lm_loss, prepare_batch
    from tests.model_utils import packed_batch, tiny_config

    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(), pc)
    if load_from:
        load_checkpoint(load_from, model)
    inp = prepare_batch(packed_batch())
    logits, _ = model(inp.tokens, inp.position_ids, inp.mask)
    loss, _ = lm_loss(logits, inp, pc)
    loss.backward()
    out = {"loss": loss.detach().numpy()}
    out["logits"] = _gather(logits, 2, pc).numpy()
    for name, p in model.named_parameters():
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert p.grad is not None, name
        out[f"grad:{name}"] = _gather(p.grad, dim, pc).numpy()
    if ckpt_dir:
        save_checkpoint(ckpt_dir, model)
        dist.barrier()
    return out


def greedy(pc) -> list[list[int]]:
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.model import CodeGeeXModel
    from tests.model_utils import tiny_config

    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(), pc)
    cfg = SamplingConfig(max_new_tokens=6, greedy=True)
    return generate(model, [[5, 6, 7, 8], [9, 10]], cfg, pad_id=0)


def _ranks(tmp: str) -> dict[str, object]:
    import torch.distributed as dist

    from megatron_code.parallel import build_parallel_context

    results: dict[str, object] = {}
    for tp in (2, 4):
        pc = build_parallel_context(tp)
        ckpt = f"{tmp}/tp{tp}" if tp == 2 else None
        out = run_step(pc, ckpt_dir=ckpt)
        if pc.rank == 0:
            results[f"tp{tp}"] = out
    pc4 = build_parallel_context(4)
    resharded = run_step(pc4, load_from=f"{tmp}/tp2")
    pc2 = build_parallel_context(2)
    gen = greedy(pc2)
    dist.barrier()
    if dist.get_rank() == 0:
        results["tp4_from_tp2"] = resharded
        results["greedy_tp2"] = gen
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_equals_single_process(tmp_path: Path):
    from megatron_code.parallel import single_context
    from tests.dist import run_ranks

    pc = single_context()
    reference = run_step(pc)
    ranks = run_ranks(_ranks, 4, str(tmp_path))
    res = ranks[0]
    for key in ("tp2", "tp4", "tp4_from_tp2"):
        got = res[key]
        assert set(got) == set(reference)
        for name, want in reference.items():
            np.testing.assert_allclose(got[name], want, err_msg=f"{key}: {name}", **TOL)
    # the TP=2 checkpoint also loads at TP=1 here, into an identically seeded model's shape
    again = run_step(pc, load_from=str(tmp_path / "tp2"))
    np.testing.assert_allclose(again["logits"], reference["logits"], **TOL)
    assert res["greedy_tp2"] == greedy(pc)
