"""The symbols the pipeline inserts into token streams itself, shared by every tokenizer kind.

PanGu-Coder's markers: ``[descr]`` starts a docstring, a per-language marker such as ``[python]`` starts the code,
``[eoc]`` ends it; ``[MASK]`` replaces corrupted docstring tokens; ``[sos]`` starts the PyCodeGPT order; the last
three are the reversible whitespace normalisation. ``<|endoftext|>`` ends every document.
"""

from __future__ import annotations

from data_pipeline.languages import LANGUAGES

EOD = "<|endoftext|>"
MARKERS = ["[descr]", "[eoc]", "[MASK]", "[sos]", "[new_line]", "[indent]", "[dedent]"]


def marker_symbols() -> list[str]:
    """The symbols the pipeline inserts itself, in a fixed order: PanGu-Coder's markers, then each language's code
    marker (a byte-level BPE tokenizer maps them onto its unused added tokens in this order)."""
    return [*MARKERS, *(lang.code_marker for lang in LANGUAGES)]
