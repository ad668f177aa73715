"""The language registry."""

from __future__ import annotations

import pytest

from data_pipeline.languages import LANGUAGES, get_language, language_for_path, load_grammar

CODEGEEX_23 = ["C++", "C", "C#", "CUDA", "Objective-C", "Objective-C++", "Python", "Java", "Scala", "TeX", "HTML",
               "PHP", "JavaScript", "TypeScript", "Go", "Shell", "Rust", "CSS", "SQL", "Kotlin", "Pascal", "R", "Fortran"]


def test_the_23_languages_with_tags_and_unique_extensions():
    assert [lang.name for lang in LANGUAGES] == CODEGEEX_23
    assert get_language("python").tag == "# language: Python"
    assert get_language("cpp").tag == "// language: C++"
    assert get_language("css").tag == "/* language: CSS */"
    exts = [e for lang in LANGUAGES for e in lang.extensions]
    assert len(exts) == len(set(exts))
    assert all(lang.tag and lang.line_comment and lang.code_marker for lang in LANGUAGES)


def test_classification_by_extension_and_shebang():
    assert language_for_path("a/b/x.PY").name == "Python"
    assert language_for_path("k.hpp").name == "C++"
    assert language_for_path("notes.txt") is None
    assert language_for_path("run", b"#!/usr/bin/env python3\nprint()").name == "Python"
    assert language_for_path("run", b"#! /bin/sh\necho").name == "Shell"
    assert language_for_path("run", b"no shebang") is None


def test_unknown_language_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown language 'cobol'; known languages: C\\+\\+, C, "):
        get_language("cobol")


def test_grammars_load_where_packaged():
    with_grammar = [lang.name for lang in LANGUAGES if lang.grammar]
    assert len(with_grammar) == 20
    for name in with_grammar:
        assert load_grammar(name) is not None, name
    assert load_grammar("TeX") is None
