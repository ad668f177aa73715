"""Continued pre-training from a CodeGeeX-layout release with CodeGeeX's own tokenizer, the whole path: a tiny model
with CodeGeeX's 52,224-row embedding written in the released .pt layout -> `model convert --to native` carrying the
tokenizer directory -> `data build --tokenizer ../shared/codegeex-tokenizer` (language tags, <|endoftext|> = 50256,
text-to-code pairs with the marker ids) -> 20 steps of training with init_from the converted checkpoint (TP=2, loss
falls, the marker rows start at the mean row) -> stage 2 with separated embeddings from it -> HumanEval-X samples in
five languages that decode to text, whitespace tokens as spaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main
from tests.conftest import shared_path

VOCAB = 52224  # CodeGeeX-13B's padded embedding
POSITIONS = 512  # HumanEval-X prompts are up to about 400 CodeGeeX tokens
LANGS = ["python", "cpp", "java", "js", "go"]


def released_file(path: Path) -> None:
    """A random tiny model in CodeGeeX's released layout (``{"module": {"language_model": ...}}``, torch.save)."""
    from megatron_code.codegeex_format import to_codegeex
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from tests.model_utils import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    model = CodeGeeXModel(cfg, single_context())
    torch.save(to_codegeex({k: v.detach() for k, v in model.named_parameters()}, cfg), path)


def check_store(store: Path, tokenizer: str) -> None:
    """The store records CodeGeeX's tokenizer and ids; every document starts with its tag as CodeGeeX writes it and
    ends with 50256; pairs use the marker tokens."""
    from common.contracts import load_store_manifest
    from data_pipeline.languages import LANGUAGES
    from data_pipeline.store import TokenStore
    from data_pipeline.tokenizer import load_tokenizer

    m = load_store_manifest(store)
    tok = load_tokenizer(tokenizer)
    assert (m.tokenizer.vocab_size, m.tokenizer.eod_id, m.tokenizer.mask_id) == (50400, 50256, 50277)
    assert m.tokenizer.marker_ids == list(range(50275, 50305)) and m.tokenizer.token_dtype == "uint16"
    assert m.tokenizer.sha256 == tok.fingerprint and m.languages["Python"].pairs > 0
    descr, python = tok.piece_id("[descr]"), tok.piece_id("[python]")
    ts = TokenStore(store)
    seen_pair = seen_file = False
    for i in range(len(ts)):
        s = ts[i]
        tokens = s.tokens[:s.num_tokens].tolist()
        tag = tok.tag_ids(LANGUAGES[s.language])
        for start in s.doc_starts.tolist():
            if start + len(tag) <= len(tokens):  # a document cut at the window's end keeps only its start
                assert tokens[start:start + len(tag)] == tag, (i, start)
                seen_pair |= tokens[start + len(tag):start + len(tag) + 1] == [descr]
                seen_file |= tokens[start + len(tag):start + len(tag) + 1] != [descr]
        assert tokens.count(50256) >= len(s.doc_starts) - 1
        if python in tokens:
            text = tok.decode(tokens)
            assert "[python]" in text and "<|extratoken_" not in text  # markers decode as their text
    assert seen_pair and seen_file


def check_marker_rows(converted: Path, store: Path) -> None:
    """init_from a converted release sets the marker rows to the mean of the tokenizer's other rows; the rest is the
    release's, bit for bit."""
    from common.contracts import load_store_manifest
    from megatron_code.checkpoint import full_state
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from megatron_code.stage2 import init_from_checkpoint
    from tests.model_utils import tiny_config

    record = load_store_manifest(store).tokenizer
    model = CodeGeeXModel(tiny_config(vocab_size=VOCAB, max_position_embeddings=POSITIONS), single_context(),
                          initialize=False)
    init_from_checkpoint(model, converted, record.marker_ids, record.vocab_size)
    got = model.word_embeddings.weight.detach()
    want = full_state(converted)[1]["word_embeddings.weight"]
    markers = torch.tensor(record.marker_ids)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[markers] = False
    others[record.vocab_size:] = False
    torch.testing.assert_close(got[markers], want[others].mean(0).expand(len(markers), -1), rtol=1e-5, atol=1e-6)
    keep = torch.ones(VOCAB, dtype=torch.bool)
    keep[markers] = False
    assert torch.equal(got[keep], want[keep])


def train(store: Path, converted: Path, tmp: Path) -> tuple[list[float], list[float]]:
    """Stage 1 (20 steps from the converted release) and stage 2 (4 steps, full separation, code-only loss from it),
    at TP=2 on 2 gloo ranks."""
    from tests.dist import run_ranks
    from tests.test_training import run_configs
    from tests.train_utils import values

    base = dict(tp=2, micro_batch_size=2, model__vocab_size=VOCAB, model__max_position_embeddings=POSITIONS,
                optim__lr=3e-3, optim__min_lr=3e-4)
    stage1 = values(str(store), str(tmp / "stage1"), train_steps=20, optim__decay_steps=20, checkpoint__interval=20,
                    init_from=str(converted), objective__name="text-code-clm", **base)
    stage2 = values(str(store), str(tmp / "stage2"), train_steps=4, optim__decay_steps=4, checkpoint__interval=4,
                    init_from=str(tmp / "stage1"), objective__name="code-clm", model__embedding_separation="full",
                    **base)
    one, two = run_ranks(run_configs, 2, [stage1, stage2])[0]
    return [r["loss"] for r in one], [r["loss"] for r in two]


def check_checkpoint(model_dir: Path, tokenizer: str) -> None:
    """The checkpoint carries the tokenizer directory, named relative to it, listed with digests."""
    from megatron_code.checkpoint import read_manifest

    manifest = read_manifest(model_dir)
    assert manifest.tokenizer is not None and manifest.tokenizer.path == "tokenizer"
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        assert (model_dir / "tokenizer" / name).read_bytes() == (Path(tokenizer) / name).read_bytes()
        assert f"tokenizer/{name}" in manifest.files
    assert manifest.model["embedding_separation"] == "full" and manifest.pairs is not None


def check_samples(samples: Path, tokenizer: str) -> None:
    """Samples for every language, decoded to text: CodeGeeX's whitespace tokens came out as spaces."""
    from data_pipeline.tokenizer import load_tokenizer
    from eval_harness.samples import read_samples

    tok = load_tokenizer(tokenizer)
    rows = read_samples(samples)
    assert len(rows) == 10 and {r["language"] for r in rows} == set(LANGS)
    assert all(isinstance(r["completion"], str) for r in rows)
    assert not any("<|extratoken_1" in r["completion"] or "<|endoftext|>" in r["completion"] for r in rows)
    whitespace = set(range(50266, 50275))
    assert any(whitespace & set(tok.encode(r["completion"])) for r in rows)  # runs of spaces were generated


@pytest.mark.slow
@pytest.mark.distributed
def test_released_codegeex_layout_to_stage_two_and_humaneval_samples(tmp_path):
    tokenizer = str(shared_path("codegeex-tokenizer"))
    data = str(shared_path("humaneval-x"))
    released_file(tmp_path / "released.pt")
    converted = tmp_path / "converted"
    assert main(["model", "convert", str(tmp_path / "released.pt"), "--to", "native", "--output", str(converted),
                 "--head-dim", "8", "--tokenizer", tokenizer]) == 0
    from megatron_code.checkpoint import read_manifest

    converted_manifest = read_manifest(converted)
    assert converted_manifest.tokenizer is not None and converted_manifest.tokenizer.path == "tokenizer"
    assert (converted_manifest.converted_from or "").endswith("released.pt")
    store = tmp_path / "store"
    assert main(["data", "build", "--input", "default", "--tokenizer", tokenizer, "--output", str(store),
                 "--seq-len", "64", "--workers", "2", "max_input_mb_per_language=0.1", "extract.functions=true"]) == 0
    check_store(store, tokenizer)
    check_marker_rows(converted, store)
    stage1, stage2 = train(store, converted, tmp_path)
    assert np.mean(stage1[-4:]) < np.mean(stage1[:4]) - 0.5, stage1
    assert all(np.isfinite(stage2)) and len(stage2) == 4
    model_dir = tmp_path / "stage2" / "checkpoints" / "step-00000004" / "model"
    check_checkpoint(model_dir, tokenizer)
    samples = tmp_path / "samples.jsonl"
    assert main(["eval", "generate", "--checkpoint", str(tmp_path / "stage2"), "--data", data, "--languages", "all",
                 "--problems", "2", "--n", "1", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "48", "--output", str(samples)]) == 0
    check_samples(samples, tokenizer)


def test_training_refuses_a_store_whose_tokenizer_does_not_fit(tmp_path):
    from types import SimpleNamespace

    from common.config import ConfigError, load_config
    from common.contracts import TokenizerRecord
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import check_store_vocab
    from tests.train_utils import values

    cfg = load_config(TrainConfig, values=values("store", str(tmp_path / "run"), model__vocab_size=50304))
    record = TokenizerRecord(path="codegeex-tokenizer", vocab_size=50400)
    store = SimpleNamespace(path=Path("store"), manifest=SimpleNamespace(tokenizer=record))
    with pytest.raises(ConfigError, match=r"store store: its tokenizer codegeex-tokenizer has 50400 entries but "
                                          r"model.vocab_size is 50304"):
        check_store_vocab(cfg, SimpleNamespace(sources=[SimpleNamespace(store=store)]))
    cfg.model.vocab_size = VOCAB
    check_store_vocab(cfg, SimpleNamespace(sources=[SimpleNamespace(store=store)]))
