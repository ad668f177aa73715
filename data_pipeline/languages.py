"""The 23 CodeGeeX training languages: extensions, comments, tag lines and tree-sitter grammars.

The tag line is prepended to every document so the model knows (and can be told at inference) which language
follows; the strings are CodeGeeX's. A language's numeric id is its position in :data:`LANGUAGES` and is what
the token store records per window, so the order below is part of the store format: append, never reorder.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class Language:
    """One language of the registry."""

    name: str  # display name, as in the tag line
    extensions: tuple[str, ...]  # lower-case, with the dot
    line_comment: str  # prefix of a line comment (or the opening of a block comment where there is none)
    tag: str  # the first line of every document of this language
    grammar: str | None = None  # "module:function" of the pip grammar package, None where none is packaged
    code_marker: str = ""  # PanGu-Coder-style start-of-code marker for text-to-code pairs, e.g. "[python]"

    @property
    def id(self) -> int:
        return LANGUAGE_IDS[self.name]

    @property
    def key(self) -> str:
        """A lower-case identifier safe for file names and config keys (``cpp``, ``csharp``, ``objective-cpp``)."""
        return self.name.lower().replace("++", "pp").replace("#", "sharp").replace(" ", "-")


LANGUAGES: tuple[Language, ...] = (
    Language("C++", (".cpp", ".cc", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".tcc"), "//",
             "// language: C++", "tree_sitter_cpp:language", "[cpp]"),
    Language("C", (".c", ".h"), "//", "// language: C", "tree_sitter_c:language", "[c]"),
    Language("C#", (".cs",), "//", "// language: C#", "tree_sitter_c_sharp:language", "[csharp]"),
    Language("CUDA", (".cu", ".cuh"), "//", "// language: Cuda", "tree_sitter_cuda:language", "[cuda]"),
    Language("Objective-C", (".m",), "//", "// language: Objective-C", "tree_sitter_objc:language", "[objc]"),
    Language("Objective-C++", (".mm",), "//", "// language: Objective-C++", None, "[objcpp]"),
    Language("Python", (".py", ".pyw", ".pyi"), "#", "# language: Python", "tree_sitter_python:language", "[python]"),
    Language("Java", (".java",), "//", "// language: Java", "tree_sitter_java:language", "[java]"),
    Language("Scala", (".scala", ".sc"), "//", "// language: Scala", "tree_sitter_scala:language", "[scala]"),
    Language("TeX", (".tex", ".sty", ".cls", ".ltx", ".dtx"), "%", "% language: TeX", None, "[tex]"),
    Language("HTML", (".html", ".htm", ".xhtml"), "<!--", "<!--language: HTML-->", "tree_sitter_html:language", "[html]"),
    Language("PHP", (".php", ".php3", ".php4", ".php5", ".phtml"), "//", "// language: PHP",
             "tree_sitter_php:language_php", "[php]"),
    Language("JavaScript", (".js", ".mjs", ".cjs", ".jsx"), "//", "// language: JavaScript",
             "tree_sitter_javascript:language", "[javascript]"),
    Language("TypeScript", (".ts", ".mts", ".cts", ".tsx"), "//", "// language: TypeScript",
             "tree_sitter_typescript:language_typescript", "[typescript]"),
    Language("Go", (".go",), "//", "// language: Go", "tree_sitter_go:language", "[go]"),
    Language("Shell", (".sh", ".bash", ".zsh", ".ksh"), "#", "# language: Shell", "tree_sitter_bash:language", "[shell]"),
    Language("Rust", (".rs",), "//", "// language: Rust", "tree_sitter_rust:language", "[rust]"),
    Language("CSS", (".css",), "/*", "/* language: CSS */", "tree_sitter_css:language", "[css]"),
    Language("SQL", (".sql",), "--", "-- language: SQL", "tree_sitter_sql:language", "[sql]"),
    Language("Kotlin", (".kt", ".kts"), "//", "// language: Kotlin", "tree_sitter_kotlin:language", "[kotlin]"),
    Language("Pascal", (".pas", ".pp", ".dpr", ".lpr"), "//", "// language: Pascal", "tree_sitter_pascal:language", "[pascal]"),
    Language("R", (".r",), "#", "# language: R", None, "[r]"),
    Language("Fortran", (".f", ".for", ".f77", ".f90", ".f95", ".f03", ".f08"), "!", "!language: Fortran",
             "tree_sitter_fortran:language", "[fortran]"),
)

LANGUAGE_IDS: dict[str, int] = {lang.name: i for i, lang in enumerate(LANGUAGES)}
_BY_EXTENSION: dict[str, Language] = {ext: lang for lang in LANGUAGES for ext in lang.extensions}
_ALIASES: dict[str, Language] = {}
for _lang in LANGUAGES:
    for _alias in {_lang.name.lower(), _lang.key, _lang.code_marker.strip("[]")}:
        _ALIASES[_alias] = _lang
_ALIASES.update({"js": _ALIASES["javascript"], "ts": _ALIASES["typescript"], "c++": _ALIASES["cpp"],
                 "cs": _ALIASES["csharp"], "bash": _ALIASES["shell"], "sh": _ALIASES["shell"],
                 "golang": _ALIASES["go"], "latex": _ALIASES["tex"], "objectivec": _ALIASES["objective-c"]})

_SHEBANGS = {"python": "Python", "python3": "Python", "sh": "Shell", "bash": "Shell", "zsh": "Shell",
             "ksh": "Shell", "dash": "Shell", "node": "JavaScript", "php": "PHP", "Rscript": "R"}


def get_language(name: str) -> Language:
    """Look a language up by display name, key or common alias (case-insensitive)."""
    lang = _ALIASES.get(name.strip().lower())
    if lang is None:
        known = ", ".join(lang.name for lang in LANGUAGES)
        raise ValueError(f"unknown language {name!r}; known languages: {known}")
    return lang


def language_for_path(path: str, head: bytes = b"") -> Language | None:
    """Classify a file by its extension, or by a ``#!`` line when it has none; None when not a training language."""
    base = os.path.basename(path)
    _, ext = os.path.splitext(base)
    if ext:
        return _BY_EXTENSION.get(ext.lower())
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].decode("latin-1").split()
        if words:
            prog = os.path.basename(words[0])
            if prog == "env" and len(words) > 1:
                prog = words[1]
            name = _SHEBANGS.get(prog) or _SHEBANGS.get(prog.rstrip("0123456789."))
            return get_language(name) if name else None
    return None


@cache
def load_grammar(lang_name: str) -> Any | None:
    """The tree-sitter ``Language`` for a registry language, or None where no grammar package is installed."""
    lang = get_language(lang_name)
    if lang.grammar is None:
        return None
    module_name, func = lang.grammar.split(":")
    try:
        import tree_sitter

        module = importlib.import_module(module_name)
        return tree_sitter.Language(getattr(module, func)())
    except ImportError:
        return None
