"""The code tokenizer: lossless on every accepted file of every language present."""

from __future__ import annotations

from collections import Counter

from common.config import load_config
from data_pipeline.config import TokenizerConfig
from data_pipeline.languages import get_language
from data_pipeline.tokenizer import EOD, MARKERS, CodeTokenizer, special_symbols
from data_pipeline.train_tokenizer import training_texts


def test_round_trip_on_every_accepted_file_of_every_language(tokenizer_model, corpus):
    tok = CodeTokenizer(tokenizer_model)
    cfg = load_config(TokenizerConfig, values={"inputs": [*corpus[0], "default"], "output": "unused",
                                               "max_input_mb_per_language": 0.25})
    counts: Counter[str] = Counter()
    failures = []
    for text in training_texts(cfg, counts):
        if tok.decode(tok.encode(text)) != text:
            failures.append(text[:80])
    languages = {k for k in counts if not k.startswith("skip:")}
    assert {"Python", "Java", "JavaScript", "Go", "C++", "C", "CSS", "Shell"} <= languages
    assert sum(counts[k] for k in languages) > 100
    assert failures == []


def test_hard_cases_round_trip(tokenizer_model):
    tok = CodeTokenizer(tokenizer_model)
    for text in ["a\r\n\tb  \r\n", "  trailing   \n\n\n", "caf\u00e9 \u65e5\u672c \u2581 x\u2581\u2581y", "\t\t\t",
                 "emoji \U0001F600 and \x7f control", "x" * 5000, "[MASK] in code <|endoftext|>"]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    batch = ["def f():\n    return 1\n", "\u2581lead", "plain"]
    assert [tok.decode(ids) for ids in tok.encode_batch(batch)] == batch


def test_specials_are_single_tokens(tokenizer_model):
    tok = CodeTokenizer(tokenizer_model)
    assert tok.encode(EOD) == [tok.eod_id]
    for sym in [*MARKERS, "[python]", get_language("cpp").tag]:
        assert len(tok.encode(sym)) == 1, sym
    assert tok.tag_ids(get_language("python"))[0] == tok.piece_id("# language: Python")
    assert len(special_symbols()) == len(set(special_symbols()))
    assert len(tok.fingerprint) == 64 and tok.token_dtype.itemsize == 2


def test_digits_are_split_and_indentation_is_grouped(tokenizer_model):
    tok = CodeTokenizer(tokenizer_model)
    pieces = list(tok.pieces(tok.encode("x = 12345")))
    assert [p for p in pieces if p.strip("\u2581").isdigit()] == ["1", "2", "3", "4", "5"]
    indent = list(tok.pieces(tok.encode("        return")))
    assert indent[0].strip("\u2581") == "" and len(indent[0]) >= 4


def test_segment_cached_batch_encoding_equals_sentencepiece(tokenizer_model, corpus):
    tok = CodeTokenizer(tokenizer_model)
    cfg = load_config(TokenizerConfig, values={"inputs": [*corpus[0], "default"], "output": "unused",
                                               "max_input_mb_per_language": 0.25})
    texts = list(training_texts(cfg, Counter()))
    texts += ["x  = 1\n\n    y", "   ", " lead and trail ", "a // language: C++ b", "tab\t x \u2581 y"]
    for chunk in range(0, len(texts), 50):  # the cache carries over between calls
        batch = texts[chunk:chunk + 50]
        assert tok.encode_batch(batch) == [list(tok.sp.encode(t)) if "\u2581" not in t else tok.encode(t) for t in batch]
    assert tok._young  # segments were cached
    tok.cache_entries = 10  # generations rotate; results stay the same
    assert tok.encode_batch(texts[:60]) == [tok.encode(t) for t in texts[:60]] and tok._old
