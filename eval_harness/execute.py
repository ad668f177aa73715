"""``codegeex eval execute`` as a library: a samples file in, a results file out, resumable (what the results file
already holds is not run again; see :mod:`eval_harness.samples`). The programs run through
:mod:`eval_harness.executor`.

The samples file may be any format :mod:`eval_harness.sample_formats` reads; a sample whose text is a whole program
(prompt included: bigcode-evaluation-harness, EvalPlus's ``solution``) is turned back into prompt + completion here,
where the problems are known, when it starts with the problem's prompt (:func:`as_completion`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.logs import progress
from eval_harness.datasets import Problem, is_mbpp, load_humaneval_x, load_mbpp
from eval_harness.execution import code_and_test
from eval_harness.executor import default_workers, ensure_tools, execute_jobs, make_jobs
from eval_harness.sample_formats import SampleFileError, split_prompt
from eval_harness.samples import ResultWriter, load_results, read_located_samples, result_id
from eval_harness.sandbox import Limits
from eval_harness.scoring import score
from eval_harness.tasks import Kind


@dataclass(frozen=True)
class ExecuteConfig:
    """What ``codegeex eval execute`` runs."""

    samples: Path  # samples.jsonl
    output: Path  # results.jsonl, appended
    data: str = ""  # HumanEval-X directory ("": none)
    mbpp: str = ""  # mbpp.jsonl, for MBPP/ task ids ("": none)
    workers: int = 0  # parallel programs (0: the cores)
    limits: Limits = field(default_factory=Limits)
    language: str = ""  # what HumanEval/N task ids and a bigcode list hold ("": python, or what tasks names)
    tasks: str = ""  # a bigcode list's task (humanevalx-cpp, mbpp, ...; "": from its file name)


def load_problems(data: str, mbpp: str, languages: set[str], with_mbpp: bool) -> dict[str, Problem]:
    """Task id -> problem, for HumanEval-X ``languages`` (from ``data``) and, ``with_mbpp``, MBPP (from ``mbpp``)."""
    problems: dict[str, Problem] = {}
    if languages:
        if not data:
            raise ValueError("--data HUMANEVAL_X_DIR is needed for " + ", ".join(sorted(languages)))
        for probs in load_humaneval_x(data, sorted(languages)).values():
            problems.update({p.task_id: p for p in probs})
    if with_mbpp:
        if not mbpp:
            raise ValueError("--mbpp FILE is needed for MBPP/ task ids")
        problems.update({p.task_id: p for p in load_mbpp(mbpp, "all")})
    return problems


def check_in_data(located: list[tuple[str, dict[str, Any]]], problems: dict[str, Problem]) -> None:
    """Every sample's task is among the problems loaded; if not, the error names the sample's file and line (or
    problem and sample of a bigcode list, which is then longer than the dataset)."""
    for where, sample in located:
        if sample["task_id"] not in problems:
            mbpp = is_mbpp(sample["task_id"])
            have = sum(is_mbpp(t) == mbpp and (mbpp or p.language == sample["language"]) for t, p in problems.items())
            raise SampleFileError(f"{where}: task {sample['task_id']} is not in the benchmark data given (it has "
                                  f"{have} {'MBPP' if mbpp else sample['language']} problems)")


def as_completion(sample: dict[str, Any], problem: Problem) -> dict[str, Any]:
    """A ``whole_program`` sample that starts with the code its kind puts before a completion (the prompt; see
    :func:`eval_harness.execution.code_and_test`) becomes that completion; one that does not stays whole, and its
    program is the text + the tests."""
    if not sample.get("whole_program"):
        return sample
    rest = split_prompt(sample["completion"], code_and_test(sample, problem)[0])
    if rest is None:
        return sample
    return {**{k: v for k, v in sample.items() if k != "whole_program"}, "completion": rest}


def execute_file(cfg: ExecuteConfig) -> dict[str, Any]:
    """Execute what is missing from ``cfg.output``; returns the run's counts. The output's lock is taken before
    anything is read from it and held until the last row is written (one writer at a time)."""
    located = read_located_samples(cfg.samples, cfg.language, cfg.tasks)
    samples = [s for _, s in located]
    with ResultWriter(cfg.output) as writer:
        done = {result_id(r) for r in writer.rows}
        located = [(w, s) for w, s in located if result_id(s) not in done]
        languages = {s["language"] for _, s in located if not is_mbpp(s["task_id"])}
        ensure_tools(languages)
        problems = load_problems(cfg.data, cfg.mbpp, languages, any(is_mbpp(s["task_id"]) for _, s in located))
        check_in_data(located, problems)
        jobs = make_jobs([as_completion(s, problems[s["task_id"]]) for _, s in located], problems)
        bar = progress(total=len(samples), initial=len(done), desc="execute", unit="sample")

        def on_result(row: dict[str, Any]) -> None:
            writer.write(row)
            bar.update(1)

        try:
            stats = execute_jobs(jobs, cfg.limits, cfg.workers or default_workers(), on_result)
        finally:
            bar.close()
    stats.update(already_done=len(done), total=len(samples))
    return stats


def summary(results: Path) -> dict[str, Any]:
    """What ``codegeex eval execute`` prints: the statuses, and pass@k (95% CI) of HumanEval-X generation and example
    tests per language with their overall rows, and of MBPP on its own; k 1, 10, 100 where the samples allow and
    always n, as ``codegeex eval report`` (each (key, sample_index) counted once)."""
    scores = score(load_results(results))
    kinds = (Kind.GENERATION, f"{Kind.GENERATION}_overall", Kind.EXAMPLE, f"{Kind.EXAMPLE}_overall", "mbpp")
    return {"statuses": scores["statuses"], **{k: scores[k] for k in kinds if k in scores}}
