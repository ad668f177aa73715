"""`codegeex model convert --to hf`: the exported directory, loaded by transformers with trust_remote_code, gives
our logits (padded and trimmed vocabulary, left padding) and our tokenizer's ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch.cli import main
from tests.conftest import require_module
from tests.model_utils import tiny_config

transformers = require_module("transformers")

REPO = Path(__file__).resolve().parents[1]
VOCAB, TOKENIZER_VOCAB = 640, 600


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny fused-QKV model with a 600-piece tokenizer in a 640-row embedding, saved and exported twice (padded,
    trimmed). Returns (our model, tokenizer path, padded export, trimmed export)."""
    from data_pipeline.tokenizer import train_tokenizer
    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.convert import tokenizer_record
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    root = tmp_path_factory.mktemp("hf")
    texts = [p.read_text() for p in sorted((REPO / "megatron_code").glob("*.py"))[:12]]
    tok_path = train_tokenizer(texts, root / "tok" / "code", TOKENIZER_VOCAB)
    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(vocab_size=VOCAB, fused_qkv=True, max_position_embeddings=32), single_context())
    model.eval()
    save_checkpoint(root / "ckpt", model, tokenizer=tokenizer_record(tok_path, VOCAB))
    for name, extra in (("padded", []), ("trimmed", ["--trim-vocab"])):
        assert main(["model", "convert", str(root / "ckpt"), "--to", "hf", "--output", str(root / name), *extra]) == 0
    return model, tok_path, root / "padded", root / "trimmed"


def _ours(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T), one document per row -> our logits (B, T, V)."""
    from megatron_code.attention import MaskInfo

    b, t = tokens.shape
    positions = torch.arange(t).expand(b, t)
    with torch.no_grad():
        return model(tokens, positions, MaskInfo(segment_ids=torch.zeros(b, t, dtype=torch.long)))[0]


@pytest.mark.parametrize("name", ["padded", "trimmed"])
def test_transformers_logits_equal_ours_with_left_padding_and_loss(exported, name):
    model, _, padded, trimmed = exported
    out = padded if name == "padded" else trimmed
    config = json.loads((out / "config.json").read_text())
    rows = VOCAB if name == "padded" else TOKENIZER_VOCAB
    assert (config["vocab_size"], config["vocab_trimmed"], config["tokenizer_vocab_size"]) == (
        rows, name == "trimmed", TOKENIZER_VOCAB)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).float().eval()
    tokens = torch.randint(0, TOKENIZER_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = _ours(model, tokens)[..., :rows]  # (2, 12, rows)
    with torch.no_grad():
        theirs = hf(input_ids=tokens, labels=tokens)
    assert theirs.logits.shape == (2, 12, rows)
    torch.testing.assert_close(theirs.logits, ours, atol=1e-5, rtol=1e-5)
    loss = F.cross_entropy(ours[:, :-1].reshape(-1, rows), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(theirs.loss, loss, atol=1e-5, rtol=1e-5)
    # row 1 left-padded by 4: its tokens' logits are its unpadded run's (positions from the attention mask)
    batch = torch.stack([tokens[0], torch.cat([torch.ones(4, dtype=torch.long), tokens[1, :8]])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        left = hf(input_ids=batch, attention_mask=mask).logits  # (2, 12, rows)
    torch.testing.assert_close(left[0], ours[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[1, 4:], ours[1, :8], atol=1e-5, rtol=1e-5)


def test_the_export_is_self_contained_and_its_tokenizer_gives_our_ids(exported):
    from data_pipeline.tokenizer import CodeTokenizer

    _, tok_path, padded, _ = exported
    assert sorted(p.name for p in padded.iterdir()) == [
        "config.json", "configuration_codegeex.py", "model.safetensors", "modeling_codegeex.py",
        "special_tokens_map.json", "tokenization_codegeex.py", "tokenizer.model", "tokenizer_config.json"]
    for name in ("configuration_codegeex.py", "modeling_codegeex.py", "tokenization_codegeex.py"):
        source = (padded / name).read_text()
        assert not any(f"{pkg}" in source for pkg in ("megatron_code", "data_pipeline", "common.", "megatron.")), name
    ours = CodeTokenizer(tok_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(padded), trust_remote_code=True)
    assert (theirs.eos_token_id, theirs.pad_token_id, len(theirs)) == (ours.eod_id, ours.pad_id, TOKENIZER_VOCAB)
    texts = [(REPO / "megatron_code" / "hf_export.py").read_text(),
             "  def f(x):\n\treturn x  # ünï \u2581 <unk> <|endoftext|>\r\n   "]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == text



def test_generate_with_left_padding_gives_our_greedy_tokens(exported):
    model, _, padded, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(padded), trust_remote_code=True).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(padded), trust_remote_code=True, padding_side="left")
    prompts = ["def f(x):", "import os\nprint(os.path"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].tolist().count(0) > 0  # the first prompt is left-padded
    out = hf.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]  # (2, 4)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        for _ in range(4):  # our model, greedy, the prefix recomputed each step
            ids = torch.cat([ids, _ours(model, ids)[:, -1, :TOKENIZER_VOCAB].argmax(-1, keepdim=True)], 1)
        assert out[row].tolist() == ids[0, -4:].tolist(), prompt


def test_refusals_name_the_flag_or_the_directory(exported, tmp_path, capsys):
    from megatron_code.convert import convert_checkpoint

    ckpt = exported[2].parent / "ckpt"
    with pytest.raises(ValueError, match="--trim-vocab applies to --to hf only"):
        convert_checkpoint(ckpt, tmp_path / "n", "native", trim_vocab=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path / 'other'} is a non-empty directory"):
        convert_checkpoint(ckpt, tmp_path / "other", "hf")
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_codegeex_tokenizer_exports_as_tokenizer_json_with_our_ids_and_logits(tmp_path):
    """A checkpoint carrying CodeGeeX's BPE directory exports tokenizer.json (whitespace rule inside): AutoTokenizer,
    without remote code, gives our ids on HumanEval-X prompts and decodes them back; logits over the 50,400 real
    tokens of a 52,224-row embedding equal ours."""
    from data_pipeline.tokenizer import load_tokenizer
    from eval_harness.datasets import load_humaneval_x
    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.convert import tokenizer_record
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from tests.conftest import shared_path

    shared = shared_path("codegeex-tokenizer")
    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(vocab_size=52224, max_position_embeddings=512), single_context()).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer=tokenizer_record(shared, 52224))
    out = tmp_path / "hf"
    assert main(["model", "convert", str(tmp_path / "ckpt"), "--to", "hf", "--output", str(out), "--trim-vocab"]) == 0
    assert {"tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json"} <= {p.name for p in out.iterdir()}
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(shared)
    assert (theirs.eos_token_id, len(theirs)) == (50256, 50400)
    problems = load_humaneval_x(shared_path("humaneval-x"), ["python", "cpp", "go"])
    texts = [p.prompt for rows in problems.values() for p in rows[:5]]
    texts.append("def f():\n          x = 1  # ten spaces, then two\n\t\treturn x\n")
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text) and theirs.decode(ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).float().eval()
    tokens = torch.tensor([ours.encode(texts[0])[:40]])  # (1, 40)
    with torch.no_grad():
        got = hf(input_ids=tokens).logits  # (1, 40, 50400)
    torch.testing.assert_close(got, _ours(model, tokens)[..., :50400], atol=1e-5, rtol=1e-5)
