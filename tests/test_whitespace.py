"""Whitespace normalisation of pairs is reversible: real source files (the Python standard library of this
machine and the test corpus's other languages) come back byte for byte."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from data_pipeline.whitespace import MarkerInCode, normalize, restore


def test_normalize_marks_levels_and_keeps_everything_else():
    code = "def f(x):\n    if x:\n        return 1\n\n  \t\n    return 2  # two\n\tcontinued\n"
    text = normalize(code)
    assert text == ("def f(x):[new_line][indent]if x:[new_line][indent]return 1[new_line][new_line]  \t[new_line]"
                    "[dedent]return 2  # two[new_line][dedent]\tcontinued[new_line]")
    assert restore(text) == code
    with pytest.raises(MarkerInCode):
        normalize('s = "[indent]"\n')


def test_round_trip_on_real_files():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:150] + sorted((Path(__file__).parent).glob("*.py"))
    checked = 0
    for path in files:
        code = path.read_text(encoding="utf-8", errors="replace")
        try:
            text = normalize(code)
        except MarkerInCode:
            continue
        assert restore(text) == code, path
        assert "\n" not in text
        checked += 1
    assert checked > 100
    # a prefix of an encoding (what generation produces) decodes to a prefix of the code
    code = (stdlib / "textwrap.py").read_text()
    text = normalize(code)
    cut = text[:len(text) // 2]
    assert code.startswith(restore(cut).rsplit("\n", 1)[0])


def test_split_anywhere_concatenates_to_the_whole_encoding():
    from data_pipeline.whitespace import normalize_split

    code = ("class A:\n    def f(self,\n          x):\n        '''doc'''\n\n        return x\n    \n"
            "    def g(self)\t{\n\treturn 1\n}\n")
    for at in range(len(code) + 1):
        head, tail = normalize_split(code, at)
        assert head + tail == normalize(code), at
    # a signature whose last line is only the next line's indentation (C++ extraction gives these)
    sig, body = "  void f(int a,\n    ", "int b) {\n    return;\n  }\n"
    head, tail = normalize_split(sig + body, len(sig))
    assert restore(head + tail) == sig + body and head == "  void f(int a,[new_line][indent]"
