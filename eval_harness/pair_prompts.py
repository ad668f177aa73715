"""Prompts for models trained on text-to-code pairs (modality-relative pre-training): the problem as the pair layout
the model saw in training (:mod:`data_pipeline.pairs`), with per-token modality, and completions mapped back to code.

HumanEval Python: the docstring of the prompt's last function is the text; the code before its body (imports,
helpers, the ``def`` line) is the code the model continues, plus, for incremental tasks, the first lines of the
reference solution. MBPP: the description and the first test are the text; the model writes the whole function.
Other languages keep the plain prompt. A completion ends at ``[eoc]``; whitespace markers are undone when the
checkpoint's data used them.
"""

from __future__ import annotations

import ast
import inspect
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from common.contracts import PairLayout
from data_pipeline.languages import get_language
from data_pipeline.pairs import pair_prompt
from data_pipeline.whitespace import normalize, restore
from eval_harness.datasets import Problem, is_mbpp
from eval_harness.stops import truncate
from eval_harness.tasks import Kind, Task

if TYPE_CHECKING:
    from data_pipeline.tokenizer import TextTokenizer


def python_prompt_parts(prompt: str) -> tuple[str, str]:
    """(docstring, the code before it) of a prompt ending in a documented function. The description is the
    function's first string statement (Python/115 puts ``import math`` before it, so it is not a docstring)."""
    tree = ast.parse(prompt)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for stmt in funcs[-1].body if funcs else []:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            lines = prompt.splitlines(keepends=True)
            return inspect.cleandoc(stmt.value.value), "".join(lines[:stmt.lineno - 1])
    raise ValueError("the prompt does not end with a documented function")


def supports_pairs(task: Task) -> bool:
    return task.language == "python" and task.kind in (Kind.GENERATION, Kind.INCREMENTAL)


def pair_task(tok: TextTokenizer, task: Task, problem: Problem, fmt: PairLayout) -> tuple[np.ndarray, np.ndarray, str]:
    """(prompt ids, their modality, the code the prompt already holds) for a Python or MBPP task."""
    if is_mbpp(task.task_id):
        docstring, code = f"{problem.prompt}\n{problem.test.splitlines()[0]}", ""
    else:
        docstring, code = python_prompt_parts(problem.prompt)
    if task.kind == Kind.INCREMENTAL:
        code_prefix = "".join(problem.canonical_solution.splitlines(keepends=True)[:task.prefix_lines])
    else:
        code_prefix = ""
    ids, modality = pair_prompt(tok, get_language("Python"), docstring, code, code_prefix, fmt.order,
                                fmt.normalize_whitespace)
    return ids, modality, code + code_prefix


def pair_completion(generated: str, code_before: str, fmt: PairLayout) -> str:
    """The code that follows ``code_before``, from the generated text (cut at ``[eoc]``, whitespace restored)."""
    text = generated.split("[eoc]", 1)[0]
    if not fmt.normalize_whitespace:
        return text
    full = restore(_normalized(code_before) + text)
    return full[len(code_before):]


@lru_cache(maxsize=256)
def _normalized(code: str) -> str:
    """The prompt's code encoded once, not at every generated token's stop check."""
    return normalize(code)


class Prompter:
    """Token ids (and modality) of each task's prompt, and its completion from generated tokens."""

    def __init__(self, tok: TextTokenizer, problems: dict[str, Problem], fmt: PairLayout | None) -> None:
        self.tok, self.problems, self.fmt = tok, problems, fmt

    def uses_pairs(self, task: Task) -> bool:
        return self.fmt is not None and supports_pairs(task)

    def encode(self, task: Task) -> tuple[list[int], list[int], str]:
        if self.fmt is None or not supports_pairs(task):
            plain = self.tok.encode(task.prompt)
            return plain, [0] * len(plain), ""
        ids, modality, code_before = pair_task(self.tok, task, self.problems[task.task_id], self.fmt)
        return ids.tolist(), modality.tolist(), code_before

    def completion(self, task: Task, new: list[int], code_before: str) -> tuple[str, bool]:
        """(the completion so far, cut at its end; whether it has ended)."""
        text = self.tok.decode(new)
        if self.fmt is None or not supports_pairs(task):
            return truncate(task.language, task.prompt, text)
        ended = "[eoc]" in text
        cut, stopped = truncate("python", "", pair_completion(text, code_before, self.fmt))  # Python's stop rules
        return cut, ended or stopped
