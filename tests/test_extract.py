"""Function-level extraction and comment removal."""

from __future__ import annotations

from data_pipeline.extract import extract_functions, remove_comments
from data_pipeline.filters import SyntaxChecker
from data_pipeline.languages import get_language
from tests.corpus import CPP, GO, JAVA, JS, PY_MODULE


def _pairs(lang_name, text):
    lang = get_language(lang_name)
    data = text.encode()
    return extract_functions(lang, data, SyntaxChecker().check(lang, data))


def test_python_docstring_signature_body():
    pairs = _pairs("python", PY_MODULE)
    assert [p.name for p in pairs] == ["area", "norm"]
    area, norm = pairs
    assert area.docstring == "Return the area of a circle of the given radius."
    assert area.signature == "def area(radius):\n"
    assert area.body == "    return math.pi * radius ** 2\n"
    assert norm.docstring == "Euclidean norm of the vector (x, y).\n\nUses math.hypot for accuracy."
    assert norm.signature == "def norm(self, x, y):\n"  # dedented out of its class
    assert norm.body == "    # hypot avoids overflow\n    return math.hypot(x, y)\n"
    compile(norm.code, "<pair>", "exec")


def test_doc_comments_in_java_javascript_go_cpp():
    add, mul = _pairs("java", JAVA)
    assert add.docstring == "Adds two integers and returns the sum.\n@param a the first"
    assert add.code == "public int add(int a, int b) {\n    return a + b;\n}\n"
    assert mul.docstring == "Multiplies two integers together."
    (rev,) = _pairs("javascript", JS)
    assert rev.docstring == "Reverse a string character by character." and rev.signature == "function reverse(s) "
    (mx,) = _pairs("go", GO)
    assert mx.docstring == "Max returns the larger of two integers."
    assert mx.code.startswith("func Max(a int, b int) int {\n\tif a > b {")
    (sm,) = _pairs("cpp", CPP)
    assert sm.docstring == "Sum all the elements of a vector of ints." and sm.body.startswith("{\n    int s = 0;")


def test_comment_removal_keeps_docstrings_and_code():
    lang = get_language("python")
    data = PY_MODULE.encode()
    out = remove_comments(lang, data, SyntaxChecker().check(lang, data)).decode()
    assert "# hypot" not in out and '"""Euclidean norm' in out and "return math.hypot(x, y)" in out
    assert out.count("\n") == PY_MODULE.count("\n") - 1
    java = get_language("java")
    data = JAVA.encode()
    out = remove_comments(java, data, SyntaxChecker().check(java, data)).decode()
    assert "/**" not in out and "// Multiplies" not in out and "return a * b;" in out
    lang_c = get_language("c")
    src = b"int x = 1; /* trailing */\nint y = 2; // end\n"
    out_c = remove_comments(lang_c, src, SyntaxChecker().check(lang_c, src))
    assert out_c == b"int x = 1;\nint y = 2;\n"
