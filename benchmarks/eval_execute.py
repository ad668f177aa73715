"""Executing HumanEval-X samples: our executor against CodeGeeX's published harness design, reimplemented here.

The reference design (CodeGeeX's ``codegeex/benchmark/execution.py``, as published): a thread pool of the same size;
for every sample, a fresh temporary directory, the program written out, one compile (``g++``, ``javac``,
``go test`` which compiles and runs) and one run, with timeouts; no sandbox beyond that, no caching (Go's default
build cache in $HOME, warm after the first program, as it would be on a developer's machine). Ours: the same programs
and workers, each in the sandbox (namespaces, own uid, rlimits), with identical programs run once, Java compiled in
batches, and Go linking against a warm read-only cache.

Two sample sets per language: the canonical solutions, and a mixed set of 4 samples per problem as a sampled model
produces them at low temperature (the canonical solution twice, a wrong answer twice).

    .venv/bin/python benchmarks/eval_execute.py --data ../shared/humaneval-x --problems 40 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_harness.datasets import load_humaneval_x  # noqa: E402
from eval_harness.executor import execute_jobs, make_jobs  # noqa: E402
from eval_harness.sandbox import Limits  # noqa: E402
from eval_harness.tasks import Kind

WRONG = {"python": "    return None\n", "cpp": "}\n", "java": "        return null;\n    }\n}\n",
         "js": "  return null\n}\n", "go": "    panic(\"no\")\n}\n"}


def reference_commands(lang: str, work: Path) -> tuple[list[list[str]], dict[str, str]]:
    """The published design's commands (compile, then run) for one program already written in ``work``."""
    env = dict(os.environ)
    if lang == "python":
        return [["/usr/bin/python3", "main.py"]], env  # the interpreter itself (a pyenv shim would slow it)
    if lang == "cpp":
        return [["g++", "-std=c++17", "main.cpp", "-o", "main", "-lcrypto", "-lssl"], ["./main"]], env
    if lang == "java":
        return [["javac", "Main.java"], ["java", "-cp", ".", "CodegeexRunner"]], env
    if lang == "js":
        return [["node", "main.js"]], {**env, "NODE_PATH": str(Path(__file__).resolve().parents[1] / ".venv/node/node_modules")}
    env.update(GO111MODULE="off", GOPATH="/usr/share/gocode")
    return [["go", "test", "main_test.go"]], env


def run_reference(samples: list[tuple[str, dict[str, str]]], workers: int) -> float:
    def one(item: tuple[str, dict[str, str]]) -> None:
        lang, files = item
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            commands, env = reference_commands(lang, Path(tmp))
            for cmd in commands:
                if subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, timeout=60).returncode:
                    break

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, samples))
    return time.perf_counter() - start


def sample_set(problems: dict[str, list], mixed: bool) -> list[dict[str, str]]:
    rows = []
    for lang, probs in problems.items():
        for p in probs:
            completions = [p.canonical_solution] * (2 if mixed else 1) + [WRONG[lang]] * (2 if mixed else 0)
            rows += [{"task_id": p.task_id, "completion": c, "kind": Kind.GENERATION, "language": lang,
                      "key": p.task_id, "sample_index": i} for i, c in enumerate(completions)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "humaneval-x"))
    ap.add_argument("--problems", type=int, default=40, help="problems per language")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--languages", default="python,cpp,java,js,go")
    args = ap.parse_args()
    problems = {lang: probs[:args.problems] for lang, probs in
                load_humaneval_x(args.data, args.languages.split(",")).items()}
    by_id = {p.task_id: p for probs in problems.values() for p in probs}
    report = {"workers": args.workers, "problems_per_language": args.problems, "cpu": os.cpu_count(), "sets": {}}
    for set_name, mixed in (("canonical", False), ("mixed", True)):
        for lang in problems:
            samples = [s for s in sample_set(problems, mixed) if s["language"] == lang]
            jobs = make_jobs(samples, by_id)
            ref_items = [(lang, dict(j.program.files)) for j in jobs]
            t_ref = run_reference(ref_items, args.workers)
            rows: list[dict] = []
            t0 = time.perf_counter()
            execute_jobs(jobs, Limits(), args.workers, rows.append)
            statuses = [r["status"] for r in rows]
            t_ours = time.perf_counter() - t0
            row = {"samples": len(samples), "reference_s": round(t_ref, 2), "ours_s": round(t_ours, 2),
                   "reference_per_s": round(len(samples) / t_ref, 2), "ours_per_s": round(len(samples) / t_ours, 2),
                   "speedup": round(t_ref / t_ours, 2), "passed": statuses.count("passed")}
            report["sets"].setdefault(set_name, {})[lang] = row
            print(set_name, lang, json.dumps(row), flush=True)
        total_ref = sum(r["reference_s"] for r in report["sets"][set_name].values())
        total_ours = sum(r["ours_s"] for r in report["sets"][set_name].values())
        report["sets"][set_name]["overall"] = {"reference_s": round(total_ref, 2), "ours_s": round(total_ours, 2),
                                               "speedup": round(total_ref / total_ours, 2)}
        print(set_name, "overall", json.dumps(report["sets"][set_name]["overall"]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
