"""The model on one process: shapes, the 13B count, per-document attention, backends, KV cache, checkpoints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from common.config import ConfigError
from common.contracts import TokenizerRecord
from megatron_code.attention import BACKENDS, MaskInfo
from megatron_code.checkpoint import full_state, load_model, reshard, save_checkpoint, tensor_specs, write_full_state
from megatron_code.codegeex_format import from_codegeex, load_codegeex_file, to_codegeex
from megatron_code.config import load_preset, preset_names
from megatron_code.model import CodeGeeXModel
from megatron_code.objectives import lm_loss, prepare_batch
from megatron_code.parallel import single_context
from tests.model_utils import packed_batch, tiny_config

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pc():
    return single_context()


def model_for(pc, seed=0, **overrides):
    torch.manual_seed(seed)
    return CodeGeeXModel(tiny_config(**overrides), pc)


def test_13b_parameter_count_on_meta_and_presets(pc):
    cfg = load_preset("codegeex-13b")
    with torch.device("meta"):
        model = CodeGeeXModel(cfg, pc, initialize=False)
    assert model.num_parameters() == 12_873_943_040
    assert cfg.total_layers == 40 and cfg.head_dim == 128
    assert {"codegeex-13b", "tiny", "350m", "pangu-coder-100m", "pangu-coder-350m"} <= set(preset_names())
    with pytest.raises(ConfigError, match=r"num_attention_heads \(40\) must be a multiple of tensor_model_parallel_size \(3\)"):
        cfg.check_tensor_parallel(3)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        load_preset("huge")


def test_packed_equals_unpacked(pc):
    model = model_for(pc).eval()
    batch = packed_batch()
    inp = prepare_batch(batch)
    logits, _ = model(inp.tokens, inp.position_ids, inp.mask)  # (B, T, V)
    for b, starts in enumerate([[0, 7, 15, 24], [0, 11, 24]]):
        for a, e in zip(starts, starts[1:]):
            alone, _ = model(inp.tokens[b:b + 1, a:e], torch.arange(e - a)[None], MaskInfo(torch.zeros(1, e - a, dtype=torch.long)))
            torch.testing.assert_close(logits[b, a:e], alone[0], **TOL)
    loss, count = lm_loss(logits, inp, pc)
    # the loss skips predictions across document boundaries and padding: 21 + 22 - 4 predictions
    assert int(count) == (24 - 2) + (24 - 1 - 4)
    assert torch.isfinite(loss)


def allowed_by_rule(seg, prefix, qi, j):
    """The mask rule of docs/model.md, for one query and one key position of a row (plain lists)."""
    return seg[qi] == seg[j] and (j <= qi or (prefix is not None and prefix[qi] and prefix[j]))


def reference_attention(q, k, v, seg, prefix, scale):
    """Attention written out position by position, independent of MaskInfo: q (B, H, Tq, D) are the last Tq of the
    Tk key positions (a KV cache when Tq < Tk); seg and prefix are (B, Tk)."""
    tq, tk = q.shape[2], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        row_seg, row_prefix = seg[b].tolist(), None if prefix is None else prefix[b].tolist()
        for i in range(tq):
            keys = [j for j in range(tk) if allowed_by_rule(row_seg, row_prefix, tk - tq + i, j)]
            scores = (q[b, :, i, None, :] * k[b][:, keys]).sum(-1) * scale  # (H, n)
            weights = (scores - scores.max(-1, keepdim=True).values).exp()
            out[b, :, i] = ((weights / weights.sum(-1, keepdim=True))[..., None] * v[b][:, keys]).sum(1)
    return out


def attention_cases():
    """(name, seg, prefix) over (B=2, T=12): several documents per row, a row of one document, left padding (-1) and
    right padding (its own id), bidirectional prefixes in two neighbouring documents and inside a left-padded row."""
    two = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    two_prefix = torch.zeros(2, 12, dtype=torch.bool)
    two_prefix[0, 5:8] = True
    two_prefix[1, :4] = True
    many = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 9, 9], [-1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    many_prefix = torch.zeros(2, 12, dtype=torch.bool)
    many_prefix[0, :2] = many_prefix[0, 3:6] = True  # PREFIX-CODE-CLM packs documents, each with its docstring
    many_prefix[1, 3:7] = True
    return [("two", two, None), ("two+prefix", two, two_prefix), ("many+padding", many, None),
            ("many+padding+prefix", many, many_prefix)]


def test_backends_agree_with_and_without_prefix():
    """sdpa (forward and gradients) and flex (forward: no CPU backward) against the position-by-position reference,
    on every case; the dense mask against the rule itself."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    for name, seg, p in attention_cases():
        rule = torch.tensor([[[allowed_by_rule(seg[b].tolist(), None if p is None else p[b].tolist(), i, j)
                               for j in range(12)] for i in range(12)] for b in range(2)])
        assert torch.equal(MaskInfo(seg, p).dense(12)[:, 0], rule), name
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        want = reference_attention(*leaves, seg, p, 0.3)
        want_grads = torch.autograd.grad(want, leaves, grad)
        got = BACKENDS["sdpa"](*leaves, MaskInfo(seg, p), 0.3, 0.0)
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"sdpa, {n}: {m}")
        for g, w, what in zip(torch.autograd.grad(got, leaves, grad), want_grads, "qkv"):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, n=name, x=what: f"sdpa d{x}, {n}: {m}")
        flex_out = BACKENDS["flex"](q.float(), k.float(), v.float(), MaskInfo(seg, p), 0.3, 0.0)
        torch.testing.assert_close(flex_out, want.detach().float(), **TOL, msg=lambda m, n=name: f"flex, {n}: {m}")
    # the prefix really is bidirectional: position 5 (in the prefix) sees 7, position 8 (after it) does not see 9
    m = MaskInfo(*attention_cases()[1][1:]).dense(12)[0, 0]
    assert m[5, 7] and not m[8, 9] and not m[5, 4]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backends_with_a_kv_cache_match_the_reference(backend):
    """Incremental attention (a prefill of 5 positions, a 3-position step, then one position at a time, the keys
    growing): each step equals the reference on the keys seen so far, and without a prefix the steps together equal
    the full forward. The model never resolves flex for its cache (attention.can_run); the function itself takes
    Tq < Tk, which is checked here."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    for name, seg, p in attention_cases():
        steps = []
        for a, e in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 12)]:
            pe = None if p is None else p[:, :e]
            got = BACKENDS[backend](q[:, :, a:e], k[:, :, :e], v[:, :, :e], MaskInfo(seg[:, :e], pe), 0.3, 0.0)
            want = reference_attention(q[:, :, a:e], k[:, :, :e], v[:, :, :e], seg[:, :e], pe, 0.3)
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name, x=(a, e): f"{n}, step {x}: {m}")
            steps.append(got)
        if p is None:
            full = BACKENDS[backend](q, k, v, MaskInfo(seg), 0.3, 0.0)
            torch.testing.assert_close(torch.cat(steps, dim=2), full, **TOL)
            torch.testing.assert_close(full, reference_attention(q, k, v, seg, None, 0.3), **TOL)


def test_flex_block_sparsity_per_row_and_its_refusal_of_dropout():
    """Past one 128-position block, rows whose documents cut the blocks differently (a block empty in one row is not
    in the other), checked against sdpa; dropout is refused by name. Eager flex on the CPU applies the mask per
    element, so a block mask that is not per row shows only in compiled flex on a GPU (test_gpu.py's first row)."""
    torch.manual_seed(3)
    b, t = 2, 384
    q, k, v = (torch.randn(b, 2, t, 8) for _ in range(3))
    docs = np.zeros((b, t), dtype=np.int64)
    docs[0, 128:] = 1  # row 0: queries of blocks 1 and 2 never see block 0; row 1: one document throughout
    docs[1, 300:] = 1
    mask = MaskInfo.from_documents(docs)
    want = BACKENDS["sdpa"](q, k, v, MaskInfo.from_documents(docs), 0.35, 0.0)
    torch.testing.assert_close(BACKENDS["flex"](q, k, v, mask, 0.35, 0.0), want, **TOL)
    with pytest.raises(RuntimeError, match="^attention_backend 'flex' has no attention dropout; set "
                                           "attention_dropout=0 or use 'sdpa'$"):
        BACKENDS["flex"](q, k, v, mask, 0.35, 0.1)
    prefix = torch.zeros(b, t, dtype=torch.bool)
    assert MaskInfo.from_documents(docs, prefix=prefix).prefix is prefix


def test_masks_are_built_once_per_shape_and_dtype_and_sdpa_applies_dropout():
    """Every layer of a batch gets the same mask object (one build per query length and dtype, a KV-cache step
    included); a new length or dtype is built anew, right. sdpa's attention dropout is applied, from torch's RNG."""
    info = MaskInfo.from_documents(np.array([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3]]))
    for tq in (6, 1):  # a full forward, then a one-position step against all six keys
        info = MaskInfo(info.segment_ids)
        dense, additive = info.dense(tq), info.additive(tq, torch.float32)
        assert info.dense(tq) is dense and info.additive(tq, torch.float32) is additive
        assert dense.shape == additive.shape == (2, 1, tq, 6)
        assert torch.equal(additive == 0, dense) and torch.equal(additive[~dense], torch.full_like(additive[~dense],
                                                                                                 float("-inf")))
    wide = info.additive(1, torch.float32)
    half = info.additive(1, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), wide) and info.additive(1, torch.bfloat16) is half
    assert info.additive(3, torch.bfloat16).shape == info.dense(3).shape == (2, 1, 3, 6)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    plain = BACKENDS["sdpa"](q, k, v, info, 0.35, 0.0)
    torch.manual_seed(5)
    dropped = BACKENDS["sdpa"](q, k, v, info, 0.35, 0.5)
    torch.manual_seed(5)
    assert torch.equal(BACKENDS["sdpa"](q, k, v, info, 0.35, 0.5), dropped) and not torch.allclose(dropped, plain)


CALLS: list[float] = []


def varlen_attention_as_flash_documents_it(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's ``flash_attn_varlen_func`` as its docstring defines it, written out on the CPU: q, k, v
    (total, H, D) hold the sequences that cu_seqlens (int32, (N + 1,)) delimit; causal attention inside each."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert causal and q.shape == k.shape == v.shape and q.dim() == 3
    CALLS.append(dropout_p)
    if dropout_p:  # flash's own dropout: not reproduced here, only passed through
        return torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0]
    assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(bounds, bounds[1:]))
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * softmax_scale  # (H, n, n)
        scores = scores.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[a:b])
    return out


def test_flash_wiring_against_flash_attns_documented_contract(monkeypatch):
    """On the CPU the flash backend runs against flash-attn's documented varlen contract (the real kernel runs in
    test_gpu_backends_agree): the host-built cu_seqlens and max_seqlen, the (B*T, H, D) packing and its inverse
    equal the position-by-position reference; the refusals name what flash cannot do."""
    import sys
    import types

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = varlen_attention_as_flash_documents_it  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 12, 8, dtype=torch.float64) for _ in range(3))
    for name, seg, _ in attention_cases():
        mask = MaskInfo.from_documents(seg.numpy(), "cpu")
        assert torch.equal(mask.segment_ids, seg) and mask.segment_ids.dtype == torch.int64
        got = BACKENDS["flash"](q, k, v, mask, 0.3, 0.0)
        torch.testing.assert_close(got, reference_attention(q, k, v, seg, None, 0.3), **TOL, msg=name)
    CALLS.clear()
    BACKENDS["flash"](q, k, v, MaskInfo.from_documents(np.zeros((2, 12))), 0.3, 0.1)
    assert CALLS == [0.1]  # attention dropout goes to flash-attn
    mask = MaskInfo.from_documents(np.array([[4, 4, 4, 1, 1, 0], [0, 0, 2, 2, 2, 2]]))
    assert mask.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12] and mask.max_seqlen == 4
    assert MaskInfo.from_documents(np.zeros((1, 5))).cu_seqlens.tolist() == [0, 5]
    with pytest.raises(RuntimeError, match="^attention_backend 'flash' supports neither a bidirectional prefix nor a "
                                           "KV cache; use 'flex'$"):
        BACKENDS["flash"](q[:, :, -1:], k, v, MaskInfo.from_documents(np.zeros((2, 12))), 0.3, 0.0)
    with pytest.raises(ValueError, match=r"^flash attention needs the batch's cu_seqlens: build the mask with "
                                         r"MaskInfo\.from_documents$"):
        BACKENDS["flash"](q, k, v, MaskInfo(attention_cases()[0][1]), 0.3, 0.0)


@pytest.mark.gpu
def test_gpu_backends_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    docs = np.concatenate([np.zeros((2, 100)), np.ones((2, 156))], axis=1).astype(np.int64)
    mask = MaskInfo.from_documents(docs, "cuda")
    ref = BACKENDS["sdpa"](q.float(), k.float(), v.float(), mask, 0.125, 0.0)
    torch.testing.assert_close(BACKENDS["flex"](q, k, v, mask, 0.125, 0.0).float(), ref, atol=2e-2, rtol=2e-2)
    try:  # on a GPU, flash-attn missing is a broken install (the marker already skips this test without a GPU)
        import flash_attn  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"flash-attn is not installed on this GPU machine ({exc}): pip install .[gpu]", pytrace=False)
    torch.testing.assert_close(BACKENDS["flash"](q, k, v, mask, 0.125, 0.0).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_kv_cache_matches_full_forward(pc, fused):
    model = model_for(pc, fused_qkv=fused).eval()
    tokens = torch.randint(0, 128, (2, 14))
    pos = torch.arange(14).repeat(2, 1)
    seg = torch.zeros(2, 14, dtype=torch.long)
    full, _ = model(tokens, pos, MaskInfo(seg))
    cache = model.new_cache(2, 16)  # allocated once, two positions to spare
    out, _ = model(tokens[:, :9], pos[:, :9], MaskInfo(seg[:, :9]), cache)
    keys = cache.keys.data_ptr()
    steps = [out]
    for t in range(9, 14):
        out, _ = model(tokens[:, t:t + 1], pos[:, t:t + 1], MaskInfo(seg[:, :t + 1]), cache)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.length == 14 and cache.keys.data_ptr() == keys  # written in place, never reallocated
    last, _ = model(tokens, pos, MaskInfo(seg), last_only=True)  # (B, 1, V): generation's prefill
    torch.testing.assert_close(last, full[:, -1:], **TOL)


def test_native_checkpoint_round_trip_and_meta_reshard_to_8(pc, tmp_path):
    model = model_for(pc)
    save_checkpoint(tmp_path / "ck", model, step=7, tokenizer=TokenizerRecord(sha256="abc"))
    loaded = load_model(tmp_path / "ck", pc)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    manifest, state = full_state(tmp_path / "ck")
    assert manifest.step == 7 and manifest.tokenizer and manifest.tokenizer.sha256 == "abc" and manifest.tp_size == 1
    write_full_state(tmp_path / "ck4", manifest, state, 4)
    assert len(list((tmp_path / "ck4").glob("*.safetensors"))) == 4
    assert torch.equal(full_state(tmp_path / "ck4")[1]["layers.1.mlp.dense_4h_to_h.weight"],
                       state["layers.1.mlp.dense_4h_to_h.weight"])
    # 13B on the meta device, split 8 ways: shapes only, no memory
    cfg = load_preset("codegeex-13b")
    with torch.device("meta"):
        big = CodeGeeXModel(cfg, pc, initialize=False)
    specs = tensor_specs(big)
    shards = reshard([dict(big.named_parameters())], specs, 8)
    assert shards[3]["layers.0.attention.query.weight"].shape == (640, 5120)
    assert shards[3]["layers.0.attention.dense.weight"].shape == (5120, 640)
    assert shards[7]["word_embeddings.weight"].shape == (6528, 5120)
    assert shards[0]["layers.0.attention.dense.bias"].shape == (5120,)


def test_one_latest_pointer_for_model_dirs_and_training_resume(tmp_path):
    """resolve_model_dir takes a model, step, checkpoints or run directory; find_latest reads the same pointer."""
    from common.contracts import CheckpointManifest, write_manifest
    from megatron_code.checkpoint import point_latest, resolve_model_dir
    from megatron_code.train_checkpoint import find_latest

    root = tmp_path / "run" / "checkpoints"
    for name in ("step-00000001", "step-00000002"):
        (root / name / "model").mkdir(parents=True)
        write_manifest(root / name / "model", CheckpointManifest(model={}, tp_size=1, tensors={}))
    point_latest(root, "step-00000001")
    assert find_latest(root) is None  # no trainer.json: not a complete training checkpoint
    (root / "step-00000001" / "trainer.json").write_text("{}")
    assert find_latest(root) == root / "step-00000001"
    point_latest(root, "step-00000002")
    assert (root / "latest").read_text() == "step-00000002\n" and not (root / "latest.tmp").exists()
    want = root / "step-00000002" / "model"
    for given in (want, want.parent, root, root.parent):
        assert resolve_model_dir(given) == want
    # names nothing (a re-save killed between its renames): the newest complete one before it, for training (with
    # trainer.json) and for a model directory (with manifest.json)
    point_latest(root, "step-00000003")
    assert find_latest(root) == root / "step-00000001"
    assert resolve_model_dir(root.parent) == root / "step-00000002" / "model"
    (root / "latest").write_text("\n")  # an empty pointer (a crash before anything was fsynced): as if none
    assert find_latest(root) == root / "step-00000001"
    assert resolve_model_dir(root.parent) == root / "step-00000002" / "model"
    for name in ("step-00000001", "step-00000002"):
        shutil.rmtree(root / name)
    point_latest(root, "step-00000003")
    assert find_latest(root) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        resolve_model_dir(root.parent)


@pytest.mark.parametrize("fused", [False, True])
def test_codegeex_layout_round_trip(pc, tmp_path, fused):
    model = model_for(pc, fused_qkv=fused).eval()
    state = {k: v.detach() for k, v in model.named_parameters()}
    obj = to_codegeex(state, model.cfg)
    torch.save(obj, tmp_path / "codegeex.pt")
    flat = load_codegeex_file(tmp_path / "codegeex.pt")
    assert "embedding.word_embeddings.weight" in flat and "transformer.topQueryLayer.attention.query.weight" in flat
    assert "transformer.layers.1.attention.key.bias" in flat
    # every tensor of the file is one of ours, bit for bit: copied as it is, or (fused QKV) the rows of one head's
    # q, k or v taken out of the fused matrix, a permutation of rows; nothing is computed, so nothing is inexact
    heads = model.cfg.num_attention_heads
    for name, t in flat.items():
        if fused and name.startswith("transformer.layers.") and ".attention." in name and name.split(".")[-2] in (
                "query", "key", "value"):
            layer, proj, kind = name.split(".")[2], name.split(".")[-2], name.split(".")[-1]
            rows = state[f"layers.{layer}.attention.query_key_value.{kind}"].view(heads, 3, -1, *t.shape[1:])
            assert torch.equal(t, rows[:, ("query", "key", "value").index(proj)].reshape(t.shape)), name
        else:
            ours = name.replace("transformer.topQueryLayer.", "top_query_layer.").replace("transformer.", "")
            ours = ours.replace("embedding.", "").replace("topQueryEmbedding.", "")
            assert torch.equal(t, state[ours]) and t.dtype == state[ours].dtype, name
    cfg, back = from_codegeex(flat, head_dim=8, fused_qkv=fused)
    assert cfg == model.cfg
    assert set(back) == set(state)
    changed = [k for k in state if not torch.equal(back[k], state[k]) or back[k].dtype != state[k].dtype]
    assert changed == [], changed  # exact: torch.equal, not a tolerance
    # and a model made of them computes exactly what the original does (same weights, same CPU kernels)
    again = CodeGeeXModel(cfg, pc, initialize=False).eval()
    again.load_state_dict(back, strict=True)
    inp = prepare_batch(packed_batch())
    with torch.no_grad():
        logits = [m(inp.tokens, inp.position_ids, inp.mask)[0] for m in (again, model)]
    assert torch.equal(*logits)
    # the 13B layout has 645 tensors
    with torch.device("meta"):
        big = CodeGeeXModel(load_preset("codegeex-13b"), pc, initialize=False)
    flat13 = to_codegeex(dict(big.named_parameters()), big.cfg)["module"]["language_model"]
    count = sum(len(v) if k == "transformer" else sum(len(m) for m in v.values()) for k, v in flat13.items())
    assert count == 645


def test_loading_never_unpickles_objects(tmp_path):
    torch.save({"module": {"language_model": {}}, "args": ConfigError("an arbitrary object")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused: the file holds objects other than tensors"):
        load_codegeex_file(tmp_path / "evil.pt")
