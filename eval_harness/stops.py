"""Where a completion ends, per language (the stop rules of HumanEval-X's harness).

- Python: at the first line that is not indented (after the first line), or at ``\\ndef``, ``\\nclass``, ``\\nif``,
  ``\\n#``, ``\\nprint``.
- Brace languages (C++, Java, JavaScript, Go, Rust): at the brace that closes what the prompt left open: the function
  body (and, in Java, the class ``Solution`` around it).
"""

from __future__ import annotations

import re

PYTHON_STOPS = ("\ndef", "\nclass", "\nif", "\n#", "\nprint")
BRACE_LANGUAGES = {"cpp", "java", "js", "go", "rust"}


def open_braces(text: str) -> int:
    return text.count("{") - text.count("}")


def truncate(language: str, prompt: str, completion: str) -> tuple[str, bool]:
    """(the completion cut at its end, whether an end was found)."""
    if language in BRACE_LANGUAGES:
        need = open_braces(prompt)
        depth = 0
        for i, ch in enumerate(completion):
            depth += (ch == "{") - (ch == "}")
            if need > 0 and depth <= -need:
                return completion[:i + 1] + "\n", True
        return completion, False
    cut = len(completion)
    for stop in PYTHON_STOPS:
        pos = completion.find(stop)
        if pos >= 0:
            cut = min(cut, pos)
    match = re.search(r"\n(?=[^\s])", completion)
    if match and match.start() > 0:
        cut = min(cut, match.start())
    return completion[:cut], cut < len(completion)
