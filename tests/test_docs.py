"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from launch.docgen import render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_config_tables_are_current():
    stale = [p.name for p in DOCS.glob("*.md") if render(p.read_text()) != p.read_text()]
    assert stale == [], f"regenerate with: python -m launch.docgen docs/*.md  (stale: {stale})"


def test_every_config_table_names_real_keys():
    text = (DOCS / "data.md").read_text()
    for key in ("`pack.seq_len`", "`dedup.threshold`", "`decontam.humaneval_x`", "`filters.max_parse_error_fraction`",
                "`sources`", "`global_batch_size`"):
        assert key in text, key
