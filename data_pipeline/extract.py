"""Function-level extraction and comment removal with tree-sitter.

Text-to-code pairs (docstring, signature, body) come from Python functions whose body opens with a docstring,
and from Java, JavaScript, Go and C++ functions preceded by a doc comment (``/** ... */``, ``///`` or a block of
``//`` lines ending on the line above the function). The body keeps its code and drops the docstring.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from common.config import option
from data_pipeline.languages import Language, load_grammar


@dataclass
class ExtractConfig:
    """Function-level extraction and comment removal."""

    functions: bool = option(False, "emit (docstring, signature, body) text-to-code pairs as documents")
    keep_files: bool = option(True, "with functions on, also keep each whole file as a document")
    remove_comments: bool = option(False, "strip comments (not Python docstrings) from whole-file documents")
    min_docstring_chars: int = option(8, "pairs whose docstring is shorter are not emitted")
    pair_order: Literal["docstring_first", "signature_first"] = option(
        "docstring_first", "docstring_first: [descr] docstring [python] signature code [eoc] (PanGu-Coder); "
        "signature_first: [sos] signature [descr] docstring [python] code [eoc] (PyCodeGPT)")
    normalize_whitespace: bool = option(False, "code of pairs with [new_line], [indent], [dedent] (reversible: "
                                        "data_pipeline.whitespace.restore gives the code back exactly)")


@dataclass(frozen=True)
class FunctionPair:
    """One documented function."""

    docstring: str  # the description, markers and common indentation removed
    signature: str  # from the start of the definition to the start of its body
    body: str  # the body without the docstring
    name: str

    @property
    def code(self) -> str:
        return self.signature + self.body


# (function node types, doc comment node types) for the languages with doc-comment extraction.
_DOC_COMMENT_LANGUAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Java": (("method_declaration", "constructor_declaration"), ("block_comment", "line_comment")),
    "JavaScript": (("function_declaration", "method_definition", "generator_function_declaration"), ("comment",)),
    "Go": (("function_declaration", "method_declaration"), ("comment",)),
    "C++": (("function_definition",), ("comment",)),
}
EXTRACT_LANGUAGES = ("Python", *_DOC_COMMENT_LANGUAGES)


@cache
def _comment_query(lang_name: str) -> Any | None:
    """A query capturing every comment-like node of the grammar, or None without grammar."""
    import tree_sitter

    grammar = load_grammar(lang_name)
    if grammar is None:
        return None
    kinds = sorted({grammar.node_kind_for_id(i) for i in range(grammar.node_kind_count)
                    if grammar.node_kind_is_named(i) and grammar.node_kind_is_visible(i)
                    and (grammar.node_kind_for_id(i) or "").endswith("comment")})
    if not kinds:
        return None
    return tree_sitter.QueryCursor(tree_sitter.Query(grammar, "[" + " ".join(f"({k})" for k in kinds) + "] @c"))


def remove_comments(lang: Language, data: bytes, tree: Any) -> bytes:
    """The source without its comments; a line left holding only whitespace by a removal is dropped."""
    query = _comment_query(lang.name)
    if query is None or tree is None:
        return data
    spans = sorted({(n.start_byte, n.end_byte) for n in query.captures(tree.root_node).get("c", [])})
    out, pos = [], 0
    for start, end in spans:
        if start < pos:
            continue  # nested inside a removed comment
        line_start = data.rfind(b"\n", 0, start) + 1
        line_end = data.find(b"\n", end)
        line_end = len(data) if line_end < 0 else line_end
        if not data[max(line_start, pos):start].strip() and not data[end:line_end].strip() and line_start >= pos:
            out.append(data[pos:line_start])  # the comment had the line to itself: drop the line
            pos = min(line_end + 1, len(data))
        else:
            out.append(data[pos:start].rstrip(b" \t") if data[end:line_end].strip() == b"" else data[pos:start])
            pos = end
    out.append(data[pos:])
    return b"".join(out)


def _clean_comment(raw: str) -> str:
    """Doc comment text without ``/**``, ``*/``, leading ``*``, ``//`` or ``///``."""
    raw = raw.strip()
    if raw.startswith("/*"):
        raw = re.sub(r"^/\*+!?", "", raw)
        raw = re.sub(r"\*+/$", "", raw)
        lines = [re.sub(r"^\s*\* ?", "", line) for line in raw.split("\n")]
    else:
        lines = [re.sub(r"^\s*//[/!]? ?", "", line) for line in raw.split("\n")]
    return textwrap.dedent("\n".join(lines)).strip()


def _python_pairs(text: bytes, tree: Any) -> list[FunctionPair]:
    pairs = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.named_children))
        if node.type != "function_definition":
            continue
        body = node.child_by_field_name("body")
        first = body.named_children[0] if body is not None and body.named_children else None
        if first is None or first.type != "expression_statement" or first.named_children[0].type != "string":
            continue
        raw_doc = text[first.start_byte:first.end_byte].decode("utf-8")
        try:
            doc = inspect.cleandoc(str(ast.literal_eval(raw_doc)))
        except (ValueError, SyntaxError):
            continue
        indent = " " * node.start_point[1]
        signature = textwrap.dedent(indent + text[node.start_byte:body.start_byte].decode("utf-8")).rstrip() + "\n"
        after = text.find(b"\n", first.end_byte)
        rest = "" if after < 0 or after >= node.end_byte else text[after + 1:node.end_byte].decode("utf-8")
        body_text = textwrap.indent(textwrap.dedent(rest), " " * 4) if rest.strip() else "    pass\n"
        name_node = node.child_by_field_name("name")
        name = text[name_node.start_byte:name_node.end_byte].decode() if name_node else "?"
        pairs.append(FunctionPair(doc, signature, body_text.rstrip() + "\n", name))
    return pairs


def _doc_comment_pairs(lang: Language, text: bytes, tree: Any) -> list[FunctionPair]:
    func_types, comment_types = _DOC_COMMENT_LANGUAGES[lang.name]
    pairs = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.named_children))
        if node.type not in func_types:
            continue
        body = node.child_by_field_name("body")
        if body is None:
            continue
        comments: list[Any] = []
        prev, line = node.prev_named_sibling, node.start_point[0]
        while prev is not None and prev.type in comment_types and prev.end_point[0] >= line - 1:
            comments.insert(0, prev)
            line = prev.start_point[0]
            prev = prev.prev_named_sibling
        if not comments:
            continue
        doc = _clean_comment("\n".join(text[c.start_byte:c.end_byte].decode("utf-8") for c in comments))
        indent = " " * node.start_point[1]
        # NUL marks where the body starts (documents never hold NUL: binary files are filtered out)
        raw = text[node.start_byte:body.start_byte] + b"\x00" + text[body.start_byte:node.end_byte]
        signature, body_text = textwrap.dedent(indent + raw.decode("utf-8")).split("\x00", 1)
        name_node = node.child_by_field_name("name") or node.child_by_field_name("declarator")
        name = text[name_node.start_byte:name_node.end_byte].decode() if name_node else "?"
        pairs.append(FunctionPair(doc, signature, body_text.rstrip() + "\n", name))
    return pairs


def extract_functions(lang: Language, data: bytes, tree: Any, min_docstring_chars: int = 8) -> list[FunctionPair]:
    """Documented functions of a parsed file, in source order; empty for languages without extraction."""
    if tree is None or lang.name not in EXTRACT_LANGUAGES:
        return []
    pairs = _python_pairs(data, tree) if lang.name == "Python" else _doc_comment_pairs(lang, data, tree)
    return [p for p in pairs if len(p.docstring) >= min_docstring_chars]
