"""CodeGeeX's tokenizer: the ids equal CodeGeeX's own tokenization on HumanEval-X, the round trip, `data encode`."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.bpe_tokenizer import CodeGeeXTokenizer
from data_pipeline.tokenizer import CodeTokenizer, TextTokenizer, check_vocab_fits, load_tokenizer
from launch.cli import main
from tests.conftest import shared_path

LANGS = ("python", "cpp", "java", "js", "go")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir():
    return shared_path("codegeex-tokenizer")


@pytest.fixture(scope="module")
def codegeex(tok_dir):
    return CodeGeeXTokenizer(tok_dir)


@pytest.fixture(scope="module")
def texts():
    """Every HumanEval-X prompt and canonical solution of the five languages."""
    out: list[str] = []
    for lang in LANGS:
        with gzip.open(shared_path("humaneval-x", lang, f"humaneval_{lang}.jsonl.gz"), "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                out += [rec["prompt"], rec["canonical_solution"]]
    assert len(out) > 1500, len(out)
    return out


def codegeex_reference(tok_dir, texts: list[str]) -> list[list[int]]:
    """CodeGeeX's own tokenization: its whitespace rule, then GPT-J's tokenizer from the released files."""
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(tok_dir))
    assert len(hf) == 50400, len(hf)  # vocab.json plus the 143 added tokens

    def rule(text: str) -> str:
        for n in range(10, 1, -1):
            text = text.replace(" " * n, f"<|extratoken_{n + 8}|>")
        return text

    return [list(ids) for ids in hf([rule(t) for t in texts])["input_ids"]]


def test_ids_equal_codegeex_and_round_trip(tok_dir, codegeex, texts):
    ours = codegeex.encode_batch(texts)
    expected = codegeex_reference(tok_dir, texts)
    bad = [i for i, (a, b) in enumerate(zip(ours, expected)) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first: {texts[bad[0]][:200]!r}"
    assert all(codegeex.encode(t) == e for t, e in zip(texts[::20], expected[::20]))
    arrays = codegeex.encode_arrays(texts[:50])
    assert all(a.dtype == np.uint16 and a.tolist() == e for a, e in zip(arrays, expected[:50]))
    assert any(50266 <= i <= 50274 for ids in ours for i in ids)  # indentation went to the whitespace tokens
    lost = [t for t, ids in zip(texts, ours) if codegeex.decode(ids) != t]
    assert not lost, f"{len(lost)} texts do not round-trip, first: {lost[0][:200]!r}"

    assert (codegeex.vocab_size, codegeex.eod_id, codegeex.pad_id) == (50400, 50256, 50256)
    # 25 spaces: 10 + 10 + 5, left to right as CodeGeeX's str.replace does; 11 spaces: 10 + a plain space
    assert codegeex.encode("a" + " " * 25 + "b") == [64, 50274, 50274, 50269, 65]
    assert codegeex.encode("x" + " " * 11 + "y") == [87, 50274, 331]  # 331: " y"
    assert codegeex.encode("end<|endoftext|>") == [437, 50256]
    assert codegeex.piece_id("<|extratoken_10|>") == 50266
    assert list(codegeex.pieces([50266, 64])) == ["<|extratoken_10|>", "a"]
    odd = ["tab\there\r\n", "naïve — ünïcode 😀\n", " " * 37 + "\n \n", "\u2581 meta space", "x" + " " * 11 + "y"]
    assert codegeex.encode_batch(odd) == codegeex_reference(tok_dir, odd)
    assert [codegeex.decode(ids) for ids in codegeex.encode_batch(odd)] == odd


def test_load_tokenizer_by_path_and_the_vocabulary_check(tok_dir, codegeex, tokenizer_model, tmp_path):
    bpe, sp = load_tokenizer(tok_dir), load_tokenizer(tokenizer_model)
    assert isinstance(bpe, CodeGeeXTokenizer) and isinstance(sp, CodeTokenizer)
    assert isinstance(bpe, TextTokenizer) and isinstance(sp, TextTokenizer)
    assert bpe.fingerprint == codegeex.fingerprint and len(bpe.fingerprint) == 64
    check_vocab_fits(bpe, 52224)  # CodeGeeX-13B's padded embedding
    check_vocab_fits(bpe, 50400)
    with pytest.raises(ValueError, match=r"has 50400 entries but the model's padded vocabulary has 50304 rows"):
        check_vocab_fits(bpe, 50304)
    with pytest.raises(FileNotFoundError, match="has no vocab.json and merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.model does not exist"):
        load_tokenizer(tmp_path / "nothing.model")


def test_data_encode_cli_with_both_kinds(tok_dir, codegeex, tokenizer_model, texts, tmp_path, caplog):
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t, "lang": "x"}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out" / "ids.jsonl"
    assert main(["data", "encode", "--tokenizer", str(tok_dir), "--input", str(src), "--output", str(out),
                 "--batch", "500"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == texts
    assert [r["ids"] for r in rows] == codegeex.encode_batch(texts)

    sp = CodeTokenizer(tokenizer_model)
    out_sp = tmp_path / "sp.jsonl"
    assert main(["data", "encode", "--tokenizer", tokenizer_model, "--input", str(src), "--output", str(out_sp)]) == 0
    rows = [json.loads(line) for line in out_sp.read_text(encoding="utf-8").splitlines()]
    assert [r["ids"] for r in rows[:40]] == [sp.encode(t) for t in texts[:40]]

    for bad, said in (('{"txt": "a"}', "got no 'text' field"), ('{"text": 3}', "got int"),
                      ("[1]", "got no 'text' field"), ('{"text": "a"', "malformed JSON record")):
        broken = tmp_path / "broken.jsonl"
        broken.write_text('{"text": "ok"}\n\n' + bad + "\n", encoding="utf-8")
        target = tmp_path / "never.jsonl"
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["data", "encode", "--tokenizer", str(tok_dir), "--input", str(broken),
                         "--output", str(target)]) == 1
        assert f"{broken}:3: " in caplog.text and said in caplog.text, caplog.text
        assert not target.exists() and not (tmp_path / "never.jsonl.tmp").exists()


def test_markers_tags_and_reserved_texts(codegeex):
    """The pipeline's markers are CodeGeeX's unused added tokens (ids 50275-50304), one id each, decoded as their
    text; tags are CodeGeeX's text; the build skips documents holding a special token's text."""
    from data_pipeline.languages import get_language
    from data_pipeline.markers import marker_symbols
    from data_pipeline.tokenizer import marker_ids, tokenizer_record

    ids = marker_ids(codegeex)
    assert ids == list(range(50275, 50305)) and codegeex.piece_id("[MASK]") == 50277
    assert codegeex.decode(ids) == "".join(marker_symbols())
    assert codegeex.encode("[MASK]") != [50277]  # text is encoded as CodeGeeX encodes it, never as a marker
    assert codegeex.tag_ids(get_language("Python")) == codegeex.encode("# language: Python\n") == [2, 3303, 25, 11361, 198]
    record = tokenizer_record(codegeex)
    assert (record.mask_id, record.marker_ids, record.eod_id, record.vocab_size) == (50277, ids, 50256, 50400)
    assert all(any(r in t for r in codegeex.reserved_texts) for t in ["a<|endoftext|>b", "x <|extratoken_12|>"])


def test_segment_cached_arrays_equal_whole_text_encoding(codegeex, texts):
    """encode_arrays cuts texts where no token crosses and encodes each distinct segment once: the same ids as
    encoding each text whole, on HumanEval-X, this project's sources and whitespace at every cut's edge."""
    tricky = ["a  b", "x\n  y", "\n\nfoo\n  bar", "  lead", "a \n b", "x\t  y", "x\r\n  y\r\nz", "x" + " " * 25 + "y",
              "", " ", "  ", "a\nb\nc", "é\n  ü", "x\n\n\n   \n\ty\n", "f(a,  b)\n}\n}\n", "'s\n's  's", "a\n\u3000b",
              "x\n\x1cy  \x85z", "tab\t\t  x\n\ty", "<|endoftext|>\nx  y"]
    sources = [p.read_text() for p in sorted((REPO / "megatron_code").glob("*.py"))]
    pool = [*texts, *tricky, *sources]
    want = codegeex.encode_batch(pool)
    for half in (pool[: len(pool) // 2], pool):  # the second call reuses the first one's segments
        got = codegeex.encode_arrays(half)
        assert [g.tolist() for g in got] == want[:len(half)]
        assert all(g.dtype == np.uint16 for g in got)
