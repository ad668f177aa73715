"""``codegeex eval {generate,execute,canonical,report,watch}``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.logs import progress

log = logging.getLogger("codegeex.eval")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("execute", help="run samples in the sandbox; results.jsonl (resumable)")
    p.add_argument("samples", help="samples.jsonl ({task_id, completion} per line, plus our optional fields)")
    _data_args(p)
    p.add_argument("--output", required=True, help="results.jsonl (appended; a rerun does only what is missing)")
    _exec_args(p)
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("canonical", help="write samples of the reference solutions (self-check of data and runners)")
    _data_args(p)
    p.add_argument("--languages", default="all")
    p.add_argument("--tasks", default="generation", help="generation,translation,example,incremental")
    p.add_argument("--output", required=True, help="samples.jsonl to write")
    p.set_defaults(func=cmd_canonical)

    p = sub.add_parser("report", help="Markdown + HTML report of one or more results files")
    p.add_argument("results", nargs="+", help="results.jsonl files (several: compared, e.g. over training steps)")
    p.add_argument("--output", required=True, help="report directory (report.md, report.html, scores.json)")
    p.add_argument("--ks", default="1,10,100")
    p.add_argument("--budget", type=int, default=0, help="also the multilingual budget allocation at this budget")
    p.set_defaults(func=cmd_report)

    from eval_harness.generate_cli import register_generate, register_watch

    register_generate(sub)
    register_watch(sub)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="HumanEval-X directory (<lang>/humaneval_<lang>.jsonl.gz)")
    p.add_argument("--mbpp", default="", help="mbpp.jsonl, for MBPP/ task ids")


def _exec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0, help="parallel programs (default: the cores)")
    p.add_argument("--timeout", type=float, default=10.0, help="run timeout per program, seconds")
    p.add_argument("--compile-timeout", type=float, default=60.0, help="compile timeout (stretched by load)")
    p.add_argument("--memory-gib", type=float, default=4.0, help="address-space limit per program")


def load_problems(data: str, mbpp: str, languages: set[str]) -> dict[str, Any]:
    from eval_harness.datasets import load_humaneval_x, load_mbpp

    problems: dict[str, Any] = {}
    langs = sorted(languages - {"mbpp"})
    if langs:
        if not data:
            raise ValueError("--data HUMANEVAL_X_DIR is needed for " + ", ".join(langs))
        for probs in load_humaneval_x(data, langs).values():
            problems.update({p.task_id: p for p in probs})
    if "mbpp" in languages:
        if not mbpp:
            raise ValueError("--mbpp FILE is needed for MBPP/ task ids")
        problems.update({p.task_id: p for p in load_mbpp(mbpp, "all")})
    return problems


def execute_file(samples_path: str, data: str, mbpp: str, output: str, workers: int = 0,
                 limits: Any = None) -> dict[str, Any]:
    """Execute what is missing from ``output``; returns the run's counts."""
    from eval_harness.executor import default_workers, ensure_tools, execute_jobs, make_jobs
    from eval_harness.samples import ResultWriter, iter_pending, read_results, read_samples, result_id
    from eval_harness.sandbox import Limits

    samples = read_samples(samples_path)
    done = {result_id(r) for r in read_results(output)}
    pending = list(iter_pending(samples, done))
    kinds = {"mbpp" if s["task_id"].startswith("MBPP/") else s["language"] for s in pending}
    ensure_tools(kinds)
    problems = load_problems(data, mbpp, kinds)
    jobs = make_jobs(pending, problems)
    writer = ResultWriter(output)
    bar = progress(total=len(samples), initial=len(done), desc="execute", unit="sample")

    def on_result(row: dict[str, Any]) -> None:
        writer.write(row)
        bar.update(1)

    try:
        stats = execute_jobs(jobs, limits or Limits(), workers or default_workers(), on_result)
    finally:
        writer.close()
        bar.close()
    stats.update(already_done=len(done), total=len(samples))
    return stats


def cmd_execute(args: argparse.Namespace) -> int:
    from eval_harness.samples import read_results
    from eval_harness.sandbox import Limits
    from eval_harness.scoring import score

    limits = Limits(timeout_s=args.timeout, compile_timeout_s=args.compile_timeout,
                    memory_bytes=int(args.memory_gib * 2**30))
    stats = execute_file(args.samples, args.data, args.mbpp, args.output, args.workers, limits)
    summary = score(read_results(args.output), ks=(1, 10, 100))
    log.info("executed %d samples (%d unique programs) in %.1f s; %d were already in %s", stats["jobs"],
             stats["unique_programs"], stats["seconds"], stats["already_done"], args.output)
    sys.stdout.write(json.dumps({"statuses": summary["statuses"], **{k: v for k, v in summary.items()
                                 if k in ("generation", "example")}}, indent=1) + "\n")
    return 0


def cmd_canonical(args: argparse.Namespace) -> int:
    from eval_harness.canonical import canonical_samples

    rows = canonical_samples(args.data, args.languages, args.tasks.split(","), args.mbpp)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    log.info("%d canonical samples -> %s", len(rows), args.output)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eval_harness.report import write_report

    paths = write_report([Path(p) for p in args.results], Path(args.output),
                         [int(k) for k in args.ks.split(",")], args.budget)
    sys.stdout.write(f"report: {paths[0]} and {paths[1]}\n")
    return 0
