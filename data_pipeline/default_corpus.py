"""The embedded default corpus: source code already installed on any machine that runs this project.

The input name ``default`` expands to the locations below that exist here, so the main job runs on a fresh
machine with no download. What it holds depends on what the machine has installed; ``codegeex data inspect``
shows the per-language counts of the store it made.
"""

from __future__ import annotations

import glob
import os
import sysconfig

from data_pipeline.languages import Language, get_language

DEFAULT = "default"


def _candidates() -> list[tuple[str, str | None]]:
    """(path or glob, language override) in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return [
        (stdlib, None),  # Python standard library (site-packages is skipped by the walker)
        ("/usr/include/c++/*", "C++"),  # libstdc++ headers have no extension
        ("/usr/include", None),  # C headers (and any C++ with a C++ extension)
        ("/usr/lib/go*/src", None),  # Go standard library, where golang-go is installed
        ("/usr/share/go*/src", None),
        ("/usr/share/gocode/src", None),  # Go libraries packaged by Debian (testify ...)
        ("/usr/lib/jvm/*/lib/src.zip", None),  # the JDK's Java sources
        ("/usr/lib/node_modules", None),  # JavaScript of globally installed npm packages
        ("/usr/share/nodejs", None),
        ("/usr/share/javascript", None),
        ("/usr/lib/git-core", None),  # Shell scripts (classified by their #! line)
        ("/usr/share/postgresql", None),  # SQL
        ("/usr/share/doc", None),  # HTML and CSS documentation
        ("/usr/share/texmf", None), ("/usr/share/texlive", None),  # TeX, where installed
        (os.path.expanduser("~/.rustup/toolchains/*/lib/rustlib/src"), None),  # Rust, with rust-src
    ]


def default_inputs() -> list[tuple[str, Language | None]]:
    """The existing locations, expanded, each once (the first listing wins), never nested in another."""
    seen: list[str] = []
    out: list[tuple[str, Language | None]] = []
    for pattern, lang in _candidates():
        for path in sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]:
            real = os.path.realpath(path)
            if not os.path.exists(real) or real in seen:
                continue
            seen.append(real)
            out.append((path, get_language(lang) if lang else None))
    return out


def expand_inputs(inputs: list[str]) -> list[tuple[str, Language | None]]:
    """Replace ``default`` by the default corpus; other inputs stay, with no language override."""
    out: list[tuple[str, Language | None]] = []
    for item in inputs:
        out.extend(default_inputs() if item == DEFAULT else [(item, None)])
    return out
