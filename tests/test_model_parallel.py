"""Tensor parallelism on 4 gloo ranks against the single-process model: TP=2 and TP=4 equal TP=1.

One spawn checks, for TP in (2, 4): logits, loss and every gathered gradient; the same with sequence parallelism
(TP=2, and TP=4 with the fused QKV layout), every collective on the group's device; a checkpoint saved at TP=2
loading at TP=4 and at TP=1 (in the parent), each into a model filled with other weights, which must then equal
the saved ones exactly and give the single-process logits, loss and gradients; greedy generation with a KV cache under TP=2 equal to TP=1's; and the
activation memory sequence parallelism saves, against the planner's formula.
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


def _full_weights(model, pc) -> dict[str, torch.Tensor]:
    return {name: _gather(p, p.partition_dim if getattr(p, "tensor_model_parallel", False) else None, pc)
            for name, p in model.named_parameters()}


def reload(model, pc, path: str) -> None:
    """Fill ``model`` with weights unlike the checkpoint's in every element (seed 1; LayerNorms included), check
    that, load ``path`` and check every parameter is then exactly the saved one (so a load that copies nothing, or
    only some ranks' slices, fails here)."""
    from megatron_code.checkpoint import full_state, load_checkpoint

    saved = full_state(path)[1]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    before = _full_weights(model, pc)
    assert set(before) == set(saved)
    for name, w in before.items():
        assert (w != saved[name]).all(), f"{name}: starts equal to the checkpoint somewhere"
    load_checkpoint(path, model)
    for name, w in _full_weights(model, pc).items():
        assert torch.equal(w, saved[name]), f"{name}: not the checkpoint's after the load"


def run_step(pc, ckpt_dir: str | None = None, load_from: str | None = None, audit=None,
             **overrides: object) -> dict[str, np.ndarray]:
    """Build the tiny model (seed 0; ``load_from``: other weights, then that checkpoint, see :func:`reload`), one
    forward/backward on the packed batch; full logits, loss, gradients and weights (the step inside ``audit``, a
    tests.device_audit context, when given)."""
    import contextlib

    import torch.distributed as dist

    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import lm_loss, prepare_batch
    from tests.model_utils import packed_batch, tiny_config

    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(**overrides), pc, initialize=not load_from)
    if load_from:
        reload(model, pc, load_from)
    with audit or contextlib.nullcontext():
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
    out.update({f"weight:{name}": w.numpy() for name, w in _full_weights(model, pc).items()})
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


MEMORY_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, vocab_size=256,
                    max_position_embeddings=128)


def activation_bytes_measured(pc, sequence_parallel: bool) -> int:
    """What autograd keeps for backward on this rank, for a (2, 128) micro-batch of a small model."""
    from megatron_code.model import CodeGeeXModel
    from tests.model_utils import tiny_config
    from tests.test_flops import saved_bytes

    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(sequence_parallel=sequence_parallel, **MEMORY_MODEL), pc)
    return saved_bytes(model, 2, 128)


def _ranks(tmp: str) -> dict[str, object]:
    import torch.distributed as dist

    from megatron_code.parallel import build_parallel_context
    from tests.device_audit import CollectiveDeviceAudit

    results: dict[str, object] = {}
    for tp in (2, 4):
        pc = build_parallel_context(tp)
        ckpt = f"{tmp}/tp{tp}" if tp == 2 else None
        out = run_step(pc, ckpt_dir=ckpt)
        if pc.rank == 0:
            results[f"tp{tp}"] = out
    pc4 = build_parallel_context(4)
    resharded = run_step(pc4, load_from=f"{tmp}/tp2")
    audit = CollectiveDeviceAudit()
    sp2 = run_step(build_parallel_context(2), audit=audit, sequence_parallel=True)
    sp4 = run_step(pc4, audit=audit, sequence_parallel=True, fused_qkv=True)
    audit.assert_clean()
    memory = {sp: activation_bytes_measured(build_parallel_context(2), sp) for sp in (False, True)}
    pc2 = build_parallel_context(2)
    gen = greedy(pc2)
    dist.barrier()
    if dist.get_rank() == 0:
        results["tp4_from_tp2"] = resharded
        results["greedy_tp2"] = gen
        results["sp_tp2"], results["sp_tp4_fused"], results["memory"] = sp2, sp4, memory
        results["audited_calls"] = audit.calls
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
    fused_reference = run_step(pc, fused_qkv=True)
    for key, ref in (("tp2", reference), ("tp4", reference), ("tp4_from_tp2", reference), ("sp_tp2", reference),
                     ("sp_tp4_fused", fused_reference)):
        got = res[key]
        assert set(got) == set(ref)
        for name, want in ref.items():
            np.testing.assert_allclose(got[name], want, err_msg=f"{key}: {name}", **TOL)
    assert res["audited_calls"] > 40  # the sequence-parallel gathers and reduce-scatters were all seen
    # sequence parallelism divides the replicated activations by TP; the planner's formula predicts both
    from megatron_code.flops import activation_bytes
    from tests.model_utils import tiny_config

    cfg = tiny_config(**MEMORY_MODEL)
    for sp, measured in res["memory"].items():
        predicted = activation_bytes(cfg, 2, 2, 128, 4, "off", sequence_parallel=sp)
        assert abs(predicted - measured) / measured < 0.05, (sp, predicted, measured)
    # the replicated parts (4sbh per layer, the embeddings' output and the final LayerNorm's input) are halved
    sbh = 128 * 2 * 64 * 4
    replicated = (4 * cfg.total_layers + 2) * sbh
    saved = res["memory"][False] - res["memory"][True]
    assert abs(saved - replicated / 2) / (replicated / 2) < 0.05, (saved, replicated)
    # the TP=2 checkpoint also loads at TP=1 here (into other weights): weights, logits, loss and gradients
    again = run_step(pc, load_from=str(tmp_path / "tp2"))
    assert set(again) == set(reference)
    for name, want in reference.items():
        np.testing.assert_allclose(again[name], want, err_msg=f"tp1_from_tp2: {name}", **TOL)
    assert res["greedy_tp2"] == greedy(pc)
