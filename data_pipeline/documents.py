"""From raw inputs to accepted documents: classification, filters, syntax check, extraction.

Shared by ``data build`` (which then tokenizes) and ``data tokenizer`` (which trains on the same accepted text,
so every file the store encodes is one the tokenizer saw the like of).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from data_pipeline.corrupt import Corrupt
from data_pipeline.extract import ExtractConfig, FunctionPair, extract_functions, remove_comments
from data_pipeline.filters import FilterConfig, Skip, SyntaxChecker, check_text
from data_pipeline.languages import Language, language_for_path
from data_pipeline.sources import RecordFields, Unit, read_unit
from data_pipeline.whitespace import DEDENT, INDENT, NEW_LINE

WHITESPACE_MARKERS = (NEW_LINE, INDENT, DEDENT)


@dataclass
class Document:
    """An accepted document: a whole file's text, or one text-to-code pair of it."""

    source: str
    language: Language
    text: str  # what is hashed, deduplicated and checked for contamination
    pair: FunctionPair | None = None  # set for text-to-code pairs (the text is then docstring + code)
    n_bytes: int = 0  # size of the file it came from (whole-file documents only)


def accepted_documents(
    unit: Unit, fields: RecordFields, filters: FilterConfig, extract: ExtractConfig,
    checker: SyntaxChecker, skips: Counter[str], corrupt: list[Corrupt] | None = None,
) -> Iterator[Document]:
    """The documents of a unit that pass every filter, in order; every rejection is counted in ``skips``, and the
    corrupt items (unreadable, malformed, not UTF-8) are appended to ``corrupt``."""
    for raw in read_unit(unit, fields):
        if isinstance(raw, Corrupt):
            skips[raw.reason] += raw.count
            if corrupt is not None:
                corrupt.append(raw)
            continue
        lang = raw.language or language_for_path(raw.path, raw.data[:128])
        if lang is None:
            skips["not_a_training_language"] += 1
            continue
        try:
            text = check_text(raw.data, filters)
            if filters.parse:
                tree = checker.check(lang, raw.data)
            elif extract.functions or extract.remove_comments:
                tree = checker.parse(lang, raw.data)
            else:
                tree = None
        except Skip as skip:
            skips[skip.reason] += 1
            if skip.reason == "invalid_utf8" and corrupt is not None:
                corrupt.append(Corrupt.undecodable(raw.source, raw.data))
            continue
        if extract.functions:
            for pair in extract_functions(lang, raw.data, tree, extract.min_docstring_chars):
                if extract.normalize_whitespace and any(m in pair.code for m in WHITESPACE_MARKERS):
                    skips["marker_text_in_code"] += 1  # normalising it could not be undone
                    continue
                yield Document(f"{raw.source}::{pair.name}", lang, f"{pair.docstring}\n{pair.code}", pair)
            if not extract.keep_files:
                continue
        if extract.remove_comments:
            text = remove_comments(lang, raw.data, tree).decode("utf-8")
            if not text.strip():
                skips["empty"] += 1
                continue
        yield Document(raw.source, lang, text, None, len(raw.data))
