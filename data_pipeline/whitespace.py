"""Reversible whitespace normalisation of code for text-to-code pairs (PanGu-Coder): ``[new_line]`` between lines,
``[indent]`` / ``[dedent]`` where the indentation grows by one level or falls back to an enclosing one.

The encoder keeps a stack of indentation strings, as Python's tokenizer does. For each non-blank line with leading
whitespace ``W``:

- levels are popped (one ``[dedent]`` each) until ``W`` starts with the top of the stack;
- if what is left of ``W`` is exactly one unit (four spaces), a level is pushed (``[indent]``);
- anything else left (a tab, two spaces, a continuation line's alignment) is kept literally after the markers.

Blank lines (empty or whitespace only) are kept verbatim and leave the stack alone. The decoder replays the markers
on the same stack, so ``restore(normalize(code)) == code`` for every text without marker strings in it (tested on a
corpus); code that contains a marker's text cannot be normalised unambiguously and is refused with
:class:`MarkerInCode`.
"""

from __future__ import annotations

NEW_LINE, INDENT, DEDENT = "[new_line]", "[indent]", "[dedent]"
UNIT = "    "


class MarkerInCode(ValueError):
    """The code already holds ``[new_line]``, ``[indent]`` or ``[dedent]`` as text."""


def _leading(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def normalize_lines(code: str) -> list[str]:
    """The encoded lines of ``code`` (split at ``\\n``); :func:`normalize` joins them with ``[new_line]``."""
    if any(m in code for m in (NEW_LINE, INDENT, DEDENT)):
        raise MarkerInCode("code holds a whitespace marker's text; it cannot be normalised reversibly")
    stack = [""]
    out = []
    for line in code.split("\n"):
        if not line.strip():
            out.append(line)
            continue
        ws, rest = line[:_leading(line)], line[_leading(line):]
        markers = ""
        while not ws.startswith(stack[-1]):
            stack.pop()
            markers += DEDENT
        extra = ws[len(stack[-1]):]
        if extra == UNIT:
            stack.append(ws)
            markers += INDENT
            extra = ""
        out.append(markers + extra + rest)
    return out


def normalize(code: str) -> str:
    return NEW_LINE.join(normalize_lines(code))


def normalize_split(code: str, at: int) -> tuple[str, str]:
    """``normalize(code)`` cut in two where ``code[:at]`` ends (the two parts concatenate to the whole encoding).
    A cut inside a line's indentation goes before that line's markers."""
    lines = normalize_lines(code)
    before = code[:at].split("\n")
    k, partial = len(before) - 1, before[-1]
    head = "".join(line + NEW_LINE for line in lines[:k])
    original, encoded = code.split("\n")[k], lines[k]
    if not original.strip():  # blank lines are kept verbatim
        cut = len(partial)
    else:
        ws = _leading(original)
        cut = len(encoded) - (len(original) - ws) + (len(partial) - ws) if len(partial) >= ws else 0
    tail = NEW_LINE.join([encoded[cut:], *lines[k + 1:]])
    return head + encoded[:cut], tail


def restore(text: str) -> str:
    """The code :func:`normalize` encoded (also for a prefix of an encoding, as generation produces)."""
    stack = [""]
    lines = []
    for line in text.split(NEW_LINE):
        markers_end = 0
        while True:
            if line.startswith(DEDENT, markers_end):
                if len(stack) > 1:
                    stack.pop()
                markers_end += len(DEDENT)
            elif line.startswith(INDENT, markers_end):
                stack.append(stack[-1] + UNIT)
                markers_end += len(INDENT)
            else:
                break
        rest = line[markers_end:]
        lines.append(rest if markers_end == 0 and not rest.strip() else stack[-1] + rest)
    return "\n".join(lines)
