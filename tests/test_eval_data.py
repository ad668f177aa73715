"""HumanEval-X and MBPP as data; prompts of every kind; pass@k."""

from __future__ import annotations

import gzip
import json
from math import comb

import pytest

from eval_harness.datasets import load_humaneval_x, load_mbpp, resolve_languages
from eval_harness.metrics import incremental_pass_at_k, mean_pass_at_k, pass_at_k
from eval_harness.tasks import generation_tasks, incremental_tasks, translation_tasks
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval_x(shared_path("humaneval-x"), "all")


def test_five_languages_164_problems_each(humaneval):
    assert list(humaneval) == ["python", "cpp", "java", "js", "go"]
    assert all(len(v) == 164 for v in humaneval.values())
    assert humaneval["js"][112].task_id == "JavaScript/112"  # the CodeGeeX2 copy is taken for JavaScript
    assert humaneval["go"][0].extra["test_setup"].startswith("package main")
    assert humaneval["cpp"][0].example_test and humaneval["python"][0].number == 0


def test_errors_name_file_line_field_and_language(tmp_path):
    with pytest.raises(ValueError, match="unknown language 'cobol'; HumanEval-X has python, cpp"):
        resolve_languages("python,cobol")
    with pytest.raises(FileNotFoundError, match="no HumanEval-X file for go under"):
        load_humaneval_x(tmp_path, ["go"])
    (tmp_path / "go").mkdir()
    with gzip.open(tmp_path / "go" / "humaneval_go.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"task_id": "Go/0", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"humaneval_go.jsonl.gz: record Go/0 lacks field\(s\) \['declaration'"):
        load_humaneval_x(tmp_path, ["go"])
    bad = tmp_path / "mbpp.jsonl"
    bad.write_text('{"task_id": 11, "code": "x", "test_list": []}\nnot json\n')
    with pytest.raises(ValueError, match="mbpp.jsonl:2: malformed JSON"):
        load_mbpp(bad)


def test_mbpp_test_split():
    problems = load_mbpp(shared_path("mbpp", "mbpp.jsonl"))
    assert len(problems) == 500 and problems[0].task_id == "MBPP/11" and problems[-1].task_id == "MBPP/510"
    assert "assert" in problems[0].test


def test_prompts_of_every_kind(humaneval):
    gen = generation_tasks(humaneval["cpp"])
    assert len(gen) == 164 and gen[0].prompt.startswith("// language: C++\n/*") and gen[0].kind == "generation"
    trans = translation_tasks(humaneval)
    assert len(trans) == 20 * 164 and len({(t.source_language, t.language) for t in trans}) == 20
    t = next(t for t in trans if t.source_language == "python" and t.language == "go" and t.task_id == "Go/3")
    py, go = humaneval["python"][3], humaneval["go"][3]
    assert t.prompt == f"code translation\nPython:\n{py.declaration}{py.canonical_solution}\nGo:\n{go.declaration}"
    assert t.key == "Go/3|translation|python->go"
    for lang, probs in humaneval.items():
        inc = incremental_tasks(probs)
        for task in inc:
            p = probs[int(task.task_id.rsplit("/", 1)[1])]
            assert task.prefix_lines < len(p.canonical_solution.splitlines())  # never the whole solution
            if lang != "python":
                added = task.prompt[len(task.prompt) - len("".join(p.canonical_solution.splitlines(True)[:task.prefix_lines])):]
                assert added.count("{") >= added.count("}")  # the body stays open
        assert {t.prefix_lines for t in inc if t.task_id == probs[0].task_id} >= {0, 1}


def test_pass_at_k_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (200, 17, 10), (5, 5, 3), (5, 0, 2)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError, match=r"k \(5\) must not exceed"):
        pass_at_k(3, 1, 5)
    assert mean_pass_at_k([(10, 1), (5, 5)], [1, 10, 100]) == {1: pytest.approx(0.55)}  # k=10 > n=5: not reported


def test_incremental_micro_and_macro():
    rows = [{"task_id": "A", "prefix_lines": i, "status": "passed" if i else "failed"} for i in range(3)]
    rows += [{"task_id": "B", "prefix_lines": 0, "status": "failed"}]
    scores = incremental_pass_at_k(rows, [1])
    assert scores["micro"][1] == pytest.approx(2 / 4)  # 4 prompts, 2 pass
    assert scores["macro"][1] == pytest.approx((2 / 3 + 0) / 2)  # per problem first
