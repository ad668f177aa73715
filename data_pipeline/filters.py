"""Per-document filters: every rejected document is counted under one reason, nothing raises.

The thresholds are PanGu-Coder's (files over 1 MB, average line length over 100, any line over 1000 characters)
plus a syntax check with the language's tree-sitter grammar where a grammar package is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.config import option
from data_pipeline.languages import Language, load_grammar

# Reasons, in the order the checks run; the store's manifest reports a count for each.
SKIP_REASONS = (
    "unreadable", "symlink_loop", "duplicate_directory", "not_a_training_language", "over_language_cap", "malformed_record",
    "empty", "too_large", "binary", "invalid_utf8", "avg_line_too_long", "line_too_long", "parse_error",
    "special_token_text", "exact_duplicate", "near_duplicate", "contaminated",
)


@dataclass
class FilterConfig:
    """Which documents are kept."""

    max_file_bytes: int = option(1_000_000, "files larger than this many bytes are skipped (too_large)")
    max_avg_line_length: float = option(100.0, "skip files whose average line length exceeds this (avg_line_too_long)")
    max_line_length: int = option(1000, "skip files with any line longer than this many characters (line_too_long)")
    parse: bool = option(True, "parse every file with its language's tree-sitter grammar, where one is installed")
    max_parse_error_fraction: float = option(
        0.0, "share of a file's bytes allowed inside tree-sitter ERROR nodes; 0 rejects any syntax error. "
        "C headers full of macros often need 0.05-0.1")

    def validate(self) -> None:
        if self.max_file_bytes <= 0:
            raise ValueError(f"filters.max_file_bytes ({self.max_file_bytes}) must be positive")
        if not 0.0 <= self.max_parse_error_fraction <= 1.0:
            raise ValueError(f"filters.max_parse_error_fraction ({self.max_parse_error_fraction}) must be in [0, 1]")


def _looks_binary(data: bytes) -> bool:
    """Git's heuristic: a NUL byte in the first 8000 bytes."""
    return b"\x00" in data[:8000]


def check_text(data: bytes, cfg: FilterConfig) -> str:
    """The decoded text, or raise :class:`Skip` with the reason. Checks that need no parser."""
    if not data.strip():
        raise Skip("empty")
    if len(data) > cfg.max_file_bytes:
        raise Skip("too_large")
    if _looks_binary(data):
        raise Skip("binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Skip("invalid_utf8") from None
    lines = text.split("\n")
    longest = max(map(len, lines))
    if longest > cfg.max_line_length:
        raise Skip("line_too_long")
    if len(text) / len(lines) > cfg.max_avg_line_length:
        raise Skip("avg_line_too_long")
    return text


class Skip(Exception):
    """A document is rejected; ``args[0]`` is one of :data:`SKIP_REASONS`."""

    @property
    def reason(self) -> str:
        return str(self.args[0])


class SyntaxChecker:
    """Parses documents with tree-sitter, one parser per language, created on first use (one per worker)."""

    def __init__(self, max_error_fraction: float = 0.0) -> None:
        self.max_error_fraction = max_error_fraction
        self._parsers: dict[str, Any] = {}
        self._queries: dict[str, Any] = {}

    def parser(self, lang: Language) -> Any | None:
        if lang.name not in self._parsers:
            grammar = load_grammar(lang.name)
            if grammar is None:
                self._parsers[lang.name] = None
            else:
                import tree_sitter

                self._parsers[lang.name] = tree_sitter.Parser(grammar)
                self._queries[lang.name] = tree_sitter.QueryCursor(tree_sitter.Query(grammar, "(ERROR) @e"))
        return self._parsers[lang.name]

    def parse(self, lang: Language, data: bytes) -> Any | None:
        """The syntax tree, or None where the language has no grammar."""
        parser = self.parser(lang)
        return None if parser is None else parser.parse(data)

    def error_fraction(self, lang: Language, tree: Any, size: int) -> float:
        """Share of the bytes covered by ERROR nodes (MISSING nodes count as one byte each)."""
        if not tree.root_node.has_error:
            return 0.0
        nodes = self._queries[lang.name].captures(tree.root_node).get("e", [])
        covered, cur_start, cur_end = 0, -1, -1
        for start, end in sorted((n.start_byte, n.end_byte) for n in nodes):
            if start > cur_end:
                covered += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        covered += cur_end - cur_start
        return max(covered, 1) / max(size, 1)

    def check(self, lang: Language, data: bytes) -> Any | None:
        """Raise ``Skip("parse_error")`` for a file that does not parse; return its tree (None without grammar)."""
        tree = self.parse(lang, data)
        if tree is None or not tree.root_node.has_error:
            return tree
        if self.max_error_fraction <= 0.0 or self.error_fraction(lang, tree, len(data)) > self.max_error_fraction:
            raise Skip("parse_error")
        return tree
