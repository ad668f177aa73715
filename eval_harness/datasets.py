"""Benchmarks as data: HumanEval-X (five languages, Rust when asked) and MBPP.

HumanEval-X is a directory of ``<lang>/humaneval_<lang>.jsonl(.gz)`` files (or the files side by side). For
JavaScript the CodeGeeX2 copy (``humaneval_js.codegeex2.jsonl.gz``), which fixes JS/112 and JS/155, is preferred
when present. Errors name the file, the line or task and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.io import read_jsonl

# key -> (display name as in the language tags, file stem)
LANGUAGES = {"python": "Python", "cpp": "C++", "java": "Java", "js": "JavaScript", "go": "Go", "rust": "Rust"}
DEFAULT_LANGUAGES = ("python", "cpp", "java", "js", "go")
REQUIRED = ("task_id", "prompt", "declaration", "canonical_solution", "test")
MBPP_PREFIX = "MBPP/"  # MBPP's task ids are MBPP/<number>
# MBPP's splits by task id (the test split is what bigcode-evaluation-harness's `mbpp` task runs, in this order)
MBPP_SPLITS = {"test": range(11, 511), "train": range(601, 975), "validation": range(511, 601), "prompt": range(1, 11),
               "all": range(0, 10**6)}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem in one language."""

    task_id: str
    language: str  # key of LANGUAGES, or "python" for MBPP
    prompt: str
    declaration: str
    canonical_solution: str
    test: str
    example_test: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # Go: import, docstring, test_setup; MBPP: test_setup_code

    @property
    def number(self) -> int:
        return int(self.task_id.rsplit("/", 1)[1])


def is_mbpp(task_id: str) -> bool:
    """An MBPP task: the completion is the whole program (no prompt before it)."""
    return task_id.startswith(MBPP_PREFIX)


def resolve_languages(names: str | list[str]) -> list[str]:
    """``all`` -> the five HumanEval-X languages; otherwise check every name."""
    wanted = list(DEFAULT_LANGUAGES) if names == "all" or names == ["all"] else (
        names.split(",") if isinstance(names, str) else list(names))
    aliases = {"c++": "cpp", "javascript": "js", "golang": "go"}
    out = []
    for name in wanted:
        key = aliases.get(name.lower(), name.lower())
        if key not in LANGUAGES:
            raise ValueError(f"unknown language {name!r}; HumanEval-X has {', '.join(LANGUAGES)}")
        out.append(key)
    return out


def humaneval_file(root: str | Path, lang: str) -> Path:
    root = Path(root)
    names = ([f"humaneval_{lang}.codegeex2.jsonl.gz"] if lang == "js" else []) + [
        f"humaneval_{lang}.jsonl.gz", f"humaneval_{lang}.jsonl"]
    for folder in (root / lang, root):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no HumanEval-X file for {lang} under {root} (looked for {lang}/{names[-2]} and "
                            f"{lang}/{names[-1]})")


def load_humaneval_x(root: str | Path, languages: str | list[str] = "all") -> dict[str, list[Problem]]:
    """language -> its problems, in task order."""
    out: dict[str, list[Problem]] = {}
    for lang in resolve_languages(languages):
        path = humaneval_file(root, lang)
        problems = []
        for rec in read_jsonl(path):
            missing = [k for k in REQUIRED if not isinstance(rec.get(k), str)]
            if missing:
                raise ValueError(f"{path}: record {rec.get('task_id', '?')} lacks field(s) {missing}")
            example = rec.get("example_test")
            extra = {k: str(rec[k]) for k in ("import", "docstring", "test_setup") if isinstance(rec.get(k), str)}
            problems.append(Problem(rec["task_id"], lang, rec["prompt"], rec["declaration"], rec["canonical_solution"],
                                    rec["test"], example if isinstance(example, str) and example != "None" else "",
                                    extra))
        out[lang] = sorted(problems, key=lambda p: p.number)
    return out


def load_mbpp(path: str | Path, split: str = "test") -> list[Problem]:
    """MBPP from ``mbpp.jsonl`` (or ``sanitized-mbpp.json``); the test split is task ids 11-510."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MBPP file {path} does not exist")
    records = json.loads(path.read_text()) if path.suffix == ".json" else list(read_jsonl(path))
    ranges = MBPP_SPLITS
    if split not in ranges:
        raise ValueError(f"MBPP split {split!r} must be one of {list(ranges)}")
    out = []
    for rec in records:
        for key in ("task_id", "code", "test_list"):
            if key not in rec:
                raise ValueError(f"{path}: record {rec.get('task_id', '?')} lacks field {key!r}")
        if rec["task_id"] not in ranges[split]:
            continue
        text = rec.get("text") or rec.get("prompt") or ""
        tests = "\n".join(rec["test_list"])
        out.append(Problem(f"{MBPP_PREFIX}{rec['task_id']}", "python", text, "", rec["code"], tests,
                           extra={"test_setup_code": rec.get("test_setup_code", "")}))
    return sorted(out, key=lambda p: p.number)
