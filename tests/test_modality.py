"""Modality-relative pre-training: the four objectives' loss and attention masks on hand-built pairs, deterministic
corruption, and full / partial embedding separation equal to the shared model right after separation, at TP=1 and
TP=2 (outputs and gradients against the single-process reference), through a checkpoint saved at TP=2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.packing import document_ids, position_ids
from megatron_code.objectives import Objective, corrupt, prepare_batch
from tests.model_utils import PAIR_IDS, packed_batch, tiny_config

TOL = dict(rtol=2e-5, atol=2e-6)
SEPARATED = [10, 11, 12, 40, 70, 100, 127]  # partial separation's rows in the tests (both TP halves)


def pair_batch(modality: list[int], tokens: list[int], starts: list[int], keys=(0, 5)) -> dict[str, np.ndarray]:
    w = len(tokens)
    return {"tokens": np.array([tokens]), "position_ids": position_ids(starts, w)[None],
            "document_ids": document_ids(starts, w)[None], "num_tokens": np.array([w], dtype=np.int32),
            "modality": np.array([modality], dtype=np.uint8), "sample_keys": np.array([keys])}


# a docstring-first pair (tag, [descr], 3 docstring tokens, [python], 2 code tokens, [eoc], EOD), then a whole file
HAND = pair_batch([3, 3, 7, 7, 7, 3, 0, 0, 0, 0, 0, 0, 0], [2, 3, 11, 12, 13, 4, 73, 72, 5, 1, 20, 21, 1], [0, 10])


def test_loss_and_attention_masks_of_each_objective():
    keep = {name: prepare_batch(HAND, objective=Objective(name, 0.15, 0, PAIR_IDS["mask"], 128)).loss_mask[0].tolist()
            for name in ("text-code-clm", "code-clm", "corrupt-code-clm", "prefix-code-clm")}
    assert keep["text-code-clm"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1]  # never across the document boundary
    code_only = [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1]  # first code token onwards; whole files are code
    assert keep["code-clm"] == keep["corrupt-code-clm"] == keep["prefix-code-clm"] == code_only
    causal = prepare_batch(HAND, objective=Objective("code-clm"))
    prefix = prepare_batch(HAND, objective=Objective("prefix-code-clm"))
    assert causal.mask.prefix is None and prefix.mask.prefix[0].tolist() == [True] * 6 + [False] * 6
    assert causal.text[0].tolist() == [True] * 6 + [False] * 6  # docstring table for the prefix under separation
    allowed, causal_allowed = prefix.mask.dense(12)[0, 0], causal.mask.dense(12)[0, 0]
    assert allowed[0, 5] and allowed[2, 4] and not causal_allowed[0, 5]  # the docstring sees all of itself
    assert not allowed[4, 6] and allowed[6, 5] and not allowed[6, 7]  # code stays causal; the prefix never sees it
    assert not allowed[10, 3] and not allowed[3, 10]  # nothing across documents
    assert torch.equal(prefix.labels, torch.tensor(HAND["tokens"])[:, 1:])
    # PyCodeGPT order: tag, [sos], 2 signature tokens, [descr], docstring, [python], body, EOD
    sig = pair_batch([3, 3, 2, 2, 3, 7, 3, 0, 0], [2, 7, 80, 81, 3, 11, 4, 90, 1], [0])
    assert prepare_batch(sig, objective=Objective("code-clm")).loss_mask[0].tolist() == [0, 1, 1, 0, 0, 0, 1, 1]
    assert prepare_batch(sig, objective=Objective("prefix-code-clm")).loss_mask[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="needs per-token modality"):
        prepare_batch(packed_batch(), objective=Objective("code-clm"))


def test_corruption_is_deterministic_per_sample_and_follows_the_rates():
    w = 400
    mod = np.full((1, w), 7, dtype=np.uint8)
    mod[0, :2] = 3
    mod[0, -50:] = 0
    tokens = np.random.default_rng(0).integers(10, 128, size=(1, w))
    obj = Objective("corrupt-code-clm", 0.3, seed=11, mask_id=PAIR_IDS["mask"], vocab_size=128)
    first = corrupt(tokens, mod, np.array([[0, 9]]), obj)
    assert np.array_equal(first, corrupt(tokens, mod, np.array([[0, 9]]), obj))  # same sample, same seed
    assert not np.array_equal(first, corrupt(tokens, mod, np.array([[0, 10]]), obj))
    assert not np.array_equal(first, corrupt(tokens, mod, np.array([[0, 9]]), Objective(**{**obj.__dict__,
                                                                                              "seed": 12})))
    masked = changed = total = 0
    for k in range(50):
        out = corrupt(tokens, mod, np.array([[1, k]]), obj)
        assert np.array_equal(out[mod != 7], tokens[mod != 7])  # markup and code are never touched
        total += int((mod == 7).sum())
        masked += int((out == PAIR_IDS["mask"]).sum())
        changed += int(((out != tokens) & (out != PAIR_IDS["mask"])).sum())
    assert abs(masked / total - 0.3 * 0.8) < 0.015 and abs(changed / total - 0.3 * 0.1 * 127 / 128) < 0.01
    inp = prepare_batch({**HAND, "tokens": HAND["tokens"]}, objective=Objective("corrupt-code-clm", 1.0, 0, 6, 128))
    assert torch.equal(inp.labels, torch.tensor(HAND["tokens"])[:, 1:])  # labels are the original tokens


def run_separated(pc, stage1: str, separation: str, save_to: str | None = None) -> dict[str, np.ndarray]:
    """A separated model from the stage-1 checkpoint: logits on the hand-built pairs, code-only loss, gradients."""
    import torch.distributed as dist

    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import lm_loss
    from megatron_code.stage2 import init_from_checkpoint
    from tests.test_model_parallel import _gather

    torch.manual_seed(5)  # a different init: every weight must come from the checkpoint
    cfg = tiny_config(embedding_separation=separation, separated_token_ids=SEPARATED if separation == "partial" else [])
    model = CodeGeeXModel(cfg, pc)
    init_from_checkpoint(model, stage1)
    inp = prepare_batch(HAND, objective=Objective("code-clm"))
    logits, _ = model(inp.tokens, inp.position_ids, inp.mask, text=inp.text)
    loss, _ = lm_loss(logits, inp, pc)
    loss.backward()
    out = {"logits": _gather(logits, 2, pc).numpy(), "loss": loss.detach().numpy()}
    for name, p in model.named_parameters():
        if name.startswith(("docstring_embeddings", "word_embeddings", "layers.0.attention.query")):
            dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            out[f"grad:{name}"] = _gather(p.grad, dim, pc).numpy()
            out[f"weight:{name}"] = _gather(p.detach(), dim, pc).numpy()
    if save_to:
        save_checkpoint(save_to, model)
        dist.barrier()
    return out


def _tp2(stage1: str, tmp: str) -> dict[str, object]:
    import torch.distributed as dist

    from megatron_code.parallel import build_parallel_context

    pc = build_parallel_context(2)
    res = {sep: run_separated(pc, stage1, sep, f"{tmp}/{sep}-tp2") for sep in ("full", "partial")}
    return res if dist.get_rank() == 0 else {}


@pytest.mark.distributed
@pytest.mark.slow
def test_separated_embeddings_equal_the_shared_model_at_tp1_and_tp2(tmp_path: Path):
    from megatron_code.checkpoint import load_model, read_manifest, save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from tests.dist import run_ranks

    pc = single_context()
    torch.manual_seed(0)
    shared = CodeGeeXModel(tiny_config(), pc)
    save_checkpoint(tmp_path / "stage1", shared)
    inp = prepare_batch(HAND, objective=Objective("code-clm"))
    want = shared(inp.tokens, inp.position_ids, inp.mask)[0].detach().numpy()
    reference = {sep: run_separated(pc, str(tmp_path / "stage1"), sep) for sep in ("full", "partial")}
    for sep, ref in reference.items():
        np.testing.assert_array_equal(ref["logits"], want)  # exactly the shared model, before any update
        np.testing.assert_array_equal(ref["weight:word_embeddings.weight"], shared.word_embeddings.weight.detach())
        assert np.abs(ref[f"grad:docstring_embeddings.{'table.weight' if sep == 'full' else 'rows'}"]).sum() > 0
    np.testing.assert_array_equal(reference["partial"]["weight:docstring_embeddings.rows"],
                                  shared.word_embeddings.weight.detach()[SEPARATED])
    ranks = run_ranks(_tp2, 2, str(tmp_path / "stage1"), str(tmp_path))
    for sep, got in ranks[0].items():
        assert set(got) == set(reference[sep])
        for name, value in reference[sep].items():
            np.testing.assert_allclose(got[name], value, err_msg=f"{sep} TP=2: {name}", **TOL)
    for sep in ("full", "partial"):  # saved at TP=2, loaded at TP=1: the same model, its separation recorded
        assert read_manifest(tmp_path / f"{sep}-tp2").model["embedding_separation"] == sep
        again = load_model(tmp_path / f"{sep}-tp2", pc)
        logits = again(inp.tokens, inp.position_ids, inp.mask, text=inp.text)[0].detach().numpy()
        np.testing.assert_allclose(logits, want, **TOL)


@pytest.mark.distributed
@pytest.mark.slow
def test_objectives_train_corruption_resumes_exactly_and_stage_two_starts_from_stage_one(tmp_path: Path):
    from tests.dist import run_ranks
    from tests.model_utils import synthetic_pair_store
    from tests.test_training import run_configs
    from tests.train_utils import values

    store = synthetic_pair_store(tmp_path / "pairs", windows=96)
    base = dict(tp=2, train_steps=20, optim__decay_steps=20, checkpoint__interval=10)
    runs = {name: values(store, str(tmp_path / name), objective__name=name, **base)
            for name in ("text-code-clm", "code-clm", "prefix-code-clm", "corrupt-code-clm")}
    runs["corrupt-part1"] = values(store, str(tmp_path / "corrupt-resumed"), objective__name="corrupt-code-clm",
                                   **{**base, "train_steps": 10})
    runs["corrupt-part2"] = values(store, str(tmp_path / "corrupt-resumed"), objective__name="corrupt-code-clm",
                                   **{**base, "train_steps": 20})
    stage1 = str(tmp_path / "text-code-clm" / "checkpoints" / "step-00000020" / "model")
    stage2 = dict(base, train_steps=4, init_from=stage1, objective__name="code-clm", optim__lr=1e-3, optim__min_lr=5e-4)
    for sep in ("none", "full", "partial"):
        runs[f"stage2-{sep}"] = values(store, str(tmp_path / f"stage2-{sep}"), model__embedding_separation=sep,
                                       model__separated_token_ids=SEPARATED if sep == "partial" else [], **stage2)
    for part, steps in (("a", 2), ("b", 4)):  # a separated stage 2 stopped after 2 steps, resumed (not re-initialised)
        runs[f"stage2-resumed-{part}"] = values(store, str(tmp_path / "stage2-resumed"), model__embedding_separation=
                                                "full", **{**stage2, "train_steps": steps, "checkpoint__interval": 2})
    got = dict(zip(runs, run_ranks(run_configs, 2, list(runs.values()))[0]))
    losses = {name: [r["loss"] for r in m] for name, m in got.items()}
    for name in ("text-code-clm", "code-clm", "prefix-code-clm", "corrupt-code-clm"):
        first, last = np.mean(losses[name][:5]), np.mean(losses[name][-5:])
        assert last < first - 0.4, (name, first, last)
    # the docstring is context, not target: code-only losses are over fewer, more predictable tokens
    assert losses["code-clm"][-1] < losses["text-code-clm"][-1]
    # the resumed run's metrics hold both parts: steps 1-10, then 11-20 after resuming; bit for bit
    assert [r["step"] for r in got["corrupt-part2"]] == list(range(1, 21))  # resumed at 11, nothing repeated
    assert losses["corrupt-part2"] == losses["corrupt-code-clm"]
    # right after separation the model is stage 1's: step 1 equal; then the docstring table learns on its own
    none, full, partial = (losses[f"stage2-{s}"] for s in ("none", "full", "partial"))
    np.testing.assert_allclose([full[0], partial[0]], [none[0], none[0]], rtol=1e-6)
    assert full[1:] != none[1:] and partial[1:] != none[1:]
    assert [r["step"] for r in got["stage2-resumed-b"]] == [1, 2, 3, 4] and losses["stage2-resumed-b"] == full
    from megatron_code.checkpoint import read_manifest

    manifest = read_manifest(tmp_path / "stage2-partial" / "checkpoints" / "step-00000004" / "model")
    assert manifest.model["embedding_separation"] == "partial"
    assert manifest.model["separated_token_ids"] == SEPARATED and manifest.pairs and manifest.pairs.order == "docstring_first"


def test_generation_uses_the_training_masks_with_a_kv_cache():
    """Greedy generation with the cache, the docstring table and the bidirectional prefix gives the tokens a full
    recomputation gives under the masks prepare_batch builds for prefix-code-clm."""
    from megatron_code.attention import MaskInfo
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    torch.manual_seed(3)
    model = CodeGeeXModel(tiny_config(embedding_separation="full"), single_context())
    with torch.no_grad():
        model.docstring_embeddings.table.weight.normal_(std=0.5)  # make the docstring table matter
    prompts = [[2, 3, 11, 12, 13, 4], [2, 3, 30, 4]]
    modality = [[3, 3, 7, 7, 7, 3], [3, 3, 7, 3]]
    cfg = SamplingConfig(max_new_tokens=5, greedy=True)
    got = generate(model, prompts, cfg, pad_id=0, modality=modality, prefix_lm=True)
    plain = generate(model, prompts, cfg, pad_id=0)
    assert got != plain  # the flags change what the model computes
    for prompt, mod, new in zip(prompts, modality, got):
        seq, flags = list(prompt), list(mod)
        for token in new:
            t = len(seq)
            f = torch.tensor([flags])
            mask = MaskInfo(torch.zeros(1, t, dtype=torch.long), (f & 2) != 0)
            logits, _ = model(torch.tensor([seq]), torch.arange(t)[None], mask, text=(f & 1) != 0)
            assert int(logits[0, -1].argmax()) == token
            seq.append(token)
            flags.append(0)


def test_pair_prompts_for_every_humaneval_python_problem():
    """Every HumanEval Python prompt splits into docstring and code; the canonical solution, generated as pair text
    (whitespace markers and [eoc] included), maps back to the canonical completion."""
    from common.contracts import PairLayout
    from data_pipeline.whitespace import normalize
    from eval_harness.datasets import load_humaneval_x
    from eval_harness.pair_prompts import pair_completion, python_prompt_parts
    from tests.conftest import shared_path

    problems = load_humaneval_x(shared_path("humaneval-x"), ["python"])["python"]
    fmt = PairLayout(order="docstring_first", normalize_whitespace=True)
    for p in problems:
        docstring, code = python_prompt_parts(p.prompt)
        assert docstring and "def " in code and p.prompt.startswith(code) and docstring.split()[0] in p.prompt
        encoded = normalize(code + p.canonical_solution)[len(normalize(code)):]
        assert pair_completion(encoded + "[eoc]junk", code, fmt) == p.canonical_solution, p.task_id


def test_keyword_rows_and_neighbours_of_a_partially_separated_checkpoint(tokenizer_model, tmp_path, caplog):
    """PES rows are the tokenizer's pieces for Python keywords and built-ins; `model neighbours` reads both spaces
    of a checkpoint and draws them (a docstring row set to another token's code row is its nearest neighbour)."""
    from common.contracts import TokenizerRecord
    from data_pipeline.tokenizer import CodeTokenizer
    from launch.cli import main
    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.neighbours import token_id
    from megatron_code.parallel import single_context
    from megatron_code.stage2 import keyword_token_ids

    tok = CodeTokenizer(tokenizer_model)
    ids = keyword_token_ids(tokenizer_model, ["Python"])
    pieces = {tok.sp.id_to_piece(i).lstrip("\u2581") for i in ids}
    assert {"def", "return", "len"} <= pieces and not pieces & {"banana", "x"}
    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(vocab_size=1280, embedding_separation="partial", separated_token_ids=ids),
                          single_context())
    d, r = token_id(tok, "def"), token_id(tok, "return")
    with torch.no_grad():  # in the docstring space only, "def" points where "return" does
        model.docstring_embeddings.rows[ids.index(d)] = model.docstring_embeddings.rows[ids.index(r)] * 3
    save_checkpoint(tmp_path / "ckpt", model, tokenizer=TokenizerRecord(path=tokenizer_model))
    caplog.set_level("INFO", logger="codegeex.model")
    assert main(["model", "neighbours", "--checkpoint", str(tmp_path / "ckpt"), "--tokens", "def,len", "--k", "5",
                 "--output", str(tmp_path / "n.png")]) == 0
    first = {m.split()[0]: m.split()[2] for m in caplog.messages if m.split()[1:2] == ["def"]}
    assert first["docstring"] == tok.sp.id_to_piece(r).replace("\u2581", "_") != first["code"]
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a single token"):
        token_id(tok, "definitely_not_a_piece")
