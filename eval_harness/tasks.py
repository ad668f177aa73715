"""What the model is asked: generation, translation and incremental prompts, each stating its kind explicitly.

- generation: the language tag line, then the problem's prompt;
- translation (every ordered pair of the languages given): ``code translation\\n{Src}:\\n`` + the source declaration and
  canonical solution + ``\\n{Tgt}:\\n`` + the target declaration (no docstring);
- incremental (PanGu-Coder): the generation prompt extended by the first 0, 1, 2, ... lines of the reference solution,
  never the whole of it; in brace languages only while the function body is still open, so that the closing-brace stop
  rule still ends generation.

The vocabulary lives here: :class:`Kind` (what a sample is, as written in samples and results files),
:class:`TaskSet` (what ``codegeex eval generate --task`` asks for) and :func:`sample_key` (a task's key, on which
resuming generation and execution depends).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from data_pipeline.languages import get_language
from eval_harness.datasets import LANGUAGES, Problem
from eval_harness.stops import BRACE_LANGUAGES, open_braces


class Kind(enum.StrEnum):
    """A sample's kind; the values are the strings of the ``kind`` field of samples and results files."""

    GENERATION = "generation"
    TRANSLATION = "translation"
    INCREMENTAL = "incremental"
    EXAMPLE = "example"  # a generation sample run against the problem's public example tests only


class TaskSet(enum.StrEnum):
    """The tasks ``codegeex eval generate --task`` generates for."""

    HUMANEVAL_X = "humaneval-x"
    TRANSLATION = "translation"
    INCREMENTAL = "incremental"
    MBPP = "mbpp"


def sample_key(task_id: str, kind: str, language: str, source_language: str = "", prefix_lines: int = 0) -> str:
    """The key of a task and of its samples: ``Go/3|translation|python->go``, ``CPP/7|incremental|2``,
    ``Java/0|generation``, ``Python/1|example``."""
    if kind == Kind.TRANSLATION:
        return f"{task_id}|{kind}|{source_language}->{language}"
    if kind == Kind.INCREMENTAL:
        return f"{task_id}|{kind}|{prefix_lines}"
    return f"{task_id}|{kind}"


@dataclass(frozen=True)
class Task:
    """One prompt to complete; ``key`` identifies it in samples and results files."""

    task_id: str  # the target problem
    kind: Kind  # generation, translation or incremental
    language: str  # target language key
    prompt: str
    source_language: str = ""  # translation only
    prefix_lines: int = -1  # incremental only: reference lines in the prompt

    @property
    def key(self) -> str:
        return sample_key(self.task_id, self.kind, self.language, self.source_language, self.prefix_lines)


def tag_line(lang: str) -> str:
    return get_language(LANGUAGES[lang]).tag + "\n"


def generation_tasks(problems: list[Problem]) -> list[Task]:
    return [Task(p.task_id, Kind.GENERATION, p.language, tag_line(p.language) + p.prompt) for p in problems]


def mbpp_tasks(problems: list[Problem]) -> list[Task]:
    """MBPP: the description and the first test in a docstring; the model writes the whole function."""
    return [Task(p.task_id, Kind.GENERATION, "python",
                 f'{tag_line("python")}"""\n{p.prompt}\n{p.test.splitlines()[0]}\n"""\n') for p in problems]


def translation_tasks(by_language: dict[str, list[Problem]]) -> list[Task]:
    """Every ordered pair of the given languages, matched by problem number."""
    tasks = []
    numbers = {lang: {p.number: p for p in probs} for lang, probs in by_language.items()}
    for src in by_language:
        for tgt in by_language:
            if src == tgt:
                continue
            for num in sorted(set(numbers[src]) & set(numbers[tgt])):
                s, t = numbers[src][num], numbers[tgt][num]
                prompt = (f"code translation\n{LANGUAGES[src]}:\n{s.declaration}{s.canonical_solution}\n"
                          f"{LANGUAGES[tgt]}:\n{t.declaration}")
                tasks.append(Task(t.task_id, Kind.TRANSLATION, tgt, prompt, source_language=src))
    return tasks


def incremental_tasks(problems: list[Problem]) -> list[Task]:
    """Prompts with 0, 1, ... reference lines added (never all of them; brace languages: body still open)."""
    tasks = []
    for p in problems:
        lines = p.canonical_solution.splitlines(keepends=True)
        base = tag_line(p.language) + p.prompt
        for i in range(len(lines)):
            prefix = "".join(lines[:i])
            if p.language in BRACE_LANGUAGES and open_braces(prefix) < 0:
                break  # the prefix closed the function body the prompt opened: the rest is no completion
            tasks.append(Task(p.task_id, Kind.INCREMENTAL, p.language, base + prefix, prefix_lines=i))
    return tasks
