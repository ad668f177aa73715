"""Reading inputs and filtering documents: every skip reason counted, nothing raised."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from common.io import read_jsonl
from data_pipeline.documents import accepted_documents
from data_pipeline.extract import ExtractConfig
from data_pipeline.filters import FilterConfig, SyntaxChecker
from data_pipeline.sources import RecordFields, enumerate_units, read_unit


def _accepted(inputs, unit_bytes=1 << 20, filters=None):
    units, skips = enumerate_units([(p, None) for p in inputs], unit_bytes, 1_000_000)
    filters = filters or FilterConfig()
    checker = SyntaxChecker(filters.max_parse_error_fraction)
    docs = []
    for u in units:
        docs += list(accepted_documents(u, RecordFields(), filters, ExtractConfig(), checker, skips))
    return docs, skips


def test_every_skip_reason_is_counted(corpus):
    inputs, expected = corpus
    docs, skips = _accepted(inputs)
    for reason in ("parse_error", "binary", "invalid_utf8", "empty", "too_large", "avg_line_too_long",
                   "line_too_long", "symlink_loop", "unreadable", "malformed_record", "not_a_training_language"):
        assert skips[reason] == expected[reason], (reason, skips)
    langs = Counter(d.language.name for d in docs)
    # tree: 6 .py kept (incl. both duplicates), Java, JS, CSS, Go, C++, Shell; 5 + 1 + 2 records; 1 zip member
    assert langs == {"Python": 6 + 5 + 1 + 1, "Java": 2, "JavaScript": 1, "CSS": 1, "Go": 2, "C++": 1, "Shell": 1}
    sources = {d.source for d in docs}
    assert any(s.endswith("src.zip!demo/Other.java") for s in sources)
    assert any("records.jsonl@" in s for s in sources)


def test_parse_filter_can_be_switched_off_and_tolerance(corpus):
    docs, skips = _accepted(corpus[0], filters=FilterConfig(parse=False))
    assert skips["parse_error"] == 0
    assert any(d.source.endswith("broken.py") for d in docs)
    docs, skips = _accepted(corpus[0], filters=FilterConfig(max_parse_error_fraction=0.9))
    assert skips["parse_error"] == 0


def test_jsonl_units_split_by_bytes_read_every_line_once(tmp_path):
    path = tmp_path / "many.jsonl"
    with open(path, "w") as fh:
        for i in range(500):
            fh.write(json.dumps({"content": f"x = {i}\n" * (i % 7 + 1), "language": "python"}) + "\n")
    for unit_bytes in (97, 1000, 1 << 20):
        units, _ = enumerate_units([(str(path), None)], unit_bytes, 1_000_000)
        contents = [d.data.decode() for u in units for d in read_unit(u, RecordFields())]
        assert len(contents) == 500
        assert contents == [f"x = {i}\n" * (i % 7 + 1) for i in range(500)]


def test_units_do_not_depend_on_anything_but_inputs_and_unit_size(corpus):
    a, _ = enumerate_units([(p, None) for p in corpus[0]], 4096, 1_000_000)
    b, _ = enumerate_units([(p, None) for p in corpus[0]], 4096, 1_000_000)
    assert [(u.kind, u.items, u.start, u.end) for u in a] == [(u.kind, u.items, u.start, u.end) for u in b]
    assert len(a) > 3


def test_read_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n[1, 2]\n')

    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected a JSON object"):
        list(read_jsonl(bad))
