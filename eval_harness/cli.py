"""``codegeex eval {execute,canonical,report,generate,watch}``: arguments only. Each command builds the typed
configuration of its library function from its arguments and calls it (:mod:`eval_harness.execute`,
:mod:`eval_harness.canonical`, :mod:`eval_harness.report`, :mod:`eval_harness.generate`, :mod:`eval_harness.watch`);
the modules that pull in torch or the runners are imported when the command runs (``generate`` and ``sandbox``, needed
for the options' defaults, import neither at module level), so ``codegeex --help`` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import get_args

from eval_harness.gen_config import BackendName, Dtype, GenerateConfig, PrefixLM, PromptFormat
from eval_harness.sandbox import Limits
from eval_harness.stopping import STOP, Stopped, stop_on_signals
from eval_harness.tasks import Kind, TaskSet

log = logging.getLogger("codegeex.eval")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("execute", help="run samples in the sandbox; results.jsonl (resumable)")
    p.add_argument("samples", help="samples.jsonl ({task_id, completion} per line, plus our optional fields), or "
                                   "the files of human-eval, bigcode-evaluation-harness (generations.json), CodeGeeX "
                                   "(generation) and EvalPlus (solution); .gz too")
    _data_args(p)
    p.add_argument("--output", required=True, help="results.jsonl (appended; a rerun does only what is missing)")
    p.add_argument("--language", default="", help="what HumanEval/N task ids and a bigcode generations.json hold: "
                                                  "python, cpp, java, js, go (default: python, or what --tasks says)")
    p.add_argument("--tasks", default="", help="the bigcode-evaluation-harness task of a generations.json: humaneval, "
                                               "mbpp, humanevalx-LANG, humanevalsynthesize-LANG (default: from its "
                                               "file name, generations_<task>.json)")
    _exec_args(p)
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("canonical", help="write samples of the reference solutions (self-check of data and runners)")
    _data_args(p)
    p.add_argument("--languages", default="all")
    p.add_argument("--tasks", default=Kind.GENERATION.value, help="generation,translation,example,incremental")
    p.add_argument("--output", required=True, help="samples.jsonl to write")
    p.set_defaults(func=cmd_canonical)

    p = sub.add_parser("report", help="Markdown + HTML report of one or more results files")
    p.add_argument("results", nargs="+", help="results.jsonl files (several: compared, e.g. over training steps)")
    p.add_argument("--output", required=True,
                   help="report directory (report.md, report.html, scores.json, figures/)")
    p.add_argument("--ks", default="", help="the k of pass@k, e.g. 1,10,100 (default: 1,10,100 where the samples "
                                            "allow; always also n, the samples per problem; '-' where k > n)")
    p.add_argument("--budget", type=int, default=0, help="also the multilingual budget allocation at this budget")
    p.add_argument("--labels", default="", help="one label per results file, comma-separated, in their order "
                                                "(default: step N from checkpoint_step, else the file name)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="samples.jsonl from a checkpoint or a Hugging Face / vLLM model (batched, "
                                        "TP x DP under torchrun, resumable)")
    _gen_args(p)
    p.add_argument("--output", required=True, help="samples.jsonl (a rerun adds only the missing samples)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("watch", help="evaluate each new checkpoint of a training run as it appears")
    p.add_argument("run_dir", help="the training run directory (RUN_DIR/checkpoints/step-N)")
    _gen_args(p, checkpoint=False)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between looks for new checkpoints")
    p.add_argument("--once", action="store_true", help="evaluate what is there, then exit")
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(func=cmd_watch)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="HumanEval-X directory (<lang>/humaneval_<lang>.jsonl.gz)")
    p.add_argument("--mbpp", default="", help="mbpp.jsonl, for MBPP/ task ids")


def _exec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0, help="parallel programs (default: the cores)")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="run timeout per program, seconds")
    p.add_argument("--compile-timeout", type=float, default=Limits.compile_timeout_s,
                   help="compile timeout (stretched by load)")
    p.add_argument("--memory-gib", type=float, default=Limits.memory_bytes / 2**30,
                   help="address-space limit per program")


def _gen_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    d = GenerateConfig()
    if checkpoint:
        p.add_argument("--checkpoint", default="", help="native: a model, step-N, checkpoints or run directory")
        p.add_argument("--backend", default=d.backend, choices=get_args(BackendName),
                       help="native: our checkpoints (TP x DP under torchrun); hf: any Hugging Face causal LM "
                            "directory (transformers' generate); vllm: vLLM on GPUs")
        p.add_argument("--model", default=d.model, help="hf, vllm: the model directory (written by save_pretrained)")
    p.add_argument("--tp", type=int, default=d.tp,
                   help="tensor-parallel size (native: ranks per model copy, the others data-parallel; vllm: GPUs)")
    p.add_argument("--dtype", default=d.dtype, choices=get_args(Dtype),
                   help="parameters' dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help="SentencePiece .model or BPE directory (default: the one the checkpoint carries)")
    p.add_argument("--data", default=d.data, help="HumanEval-X directory")
    p.add_argument("--mbpp", default=d.mbpp, help="mbpp.jsonl (for --task mbpp; the test split, ids 11-510)")
    p.add_argument("--task", default=d.task.value, choices=[t.value for t in TaskSet])
    p.add_argument("--prompt-format", default=d.prompt_format, choices=get_args(PromptFormat),
                   help="pairs: Python and MBPP prompts in the text-to-code pair layout of the checkpoint's data "
                        "(auto: when the checkpoint was trained on pairs)")
    p.add_argument("--prefix-lm", default=d.prefix_lm, choices=get_args(PrefixLM),
                   help="bidirectional attention over the prompt's docstring prefix (auto: when the checkpoint was "
                        "trained with prefix-code-clm)")
    p.add_argument("--languages", default=d.languages)
    p.add_argument("--problems", type=int, default=d.problems, help="only the first N problems per language (0: all)")
    p.add_argument("--n", type=int, default=d.n, help="samples per task")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)


def generate_config(args: argparse.Namespace) -> GenerateConfig:
    """The arguments of ``generate`` and ``watch`` (each field's argument has its name) as a GenerateConfig."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateConfig) if hasattr(args, f.name)}
    return GenerateConfig(**{**values, "task": TaskSet(args.task)})


def cmd_execute(args: argparse.Namespace) -> int:
    from eval_harness.execute import ExecuteConfig, execute_file, summary

    limits = Limits(timeout_s=args.timeout, compile_timeout_s=args.compile_timeout,
                    memory_bytes=int(args.memory_gib * 2**30))
    cfg = ExecuteConfig(Path(args.samples), Path(args.output), args.data, args.mbpp, args.workers, limits,
                        language=args.language, tasks=args.tasks)
    with stop_on_signals() as stop:
        try:
            stats = execute_file(cfg)
        except Stopped:
            log.warning("stopped by %s: every finished result is in %s and the programs in flight were killed; run "
                        "the same command again to resume (it runs only what is missing)", stop.reason, args.output)
            return stop.exit_code()
    log.info("executed %d samples (%d unique programs) in %.1f s; %d were already in %s", stats["jobs"],
             stats["unique_programs"], stats["seconds"], stats["already_done"], args.output)
    sys.stdout.write(json.dumps(summary(cfg.output), indent=1) + "\n")
    return 0


def cmd_canonical(args: argparse.Namespace) -> int:
    from eval_harness.canonical import CanonicalConfig, write_canonical

    count = write_canonical(CanonicalConfig(Path(args.output), args.data, args.languages, tuple(args.tasks.split(",")),
                                            args.mbpp))
    log.info("%d canonical samples -> %s", count, args.output)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from eval_harness.report import write_report

    try:
        ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    except ValueError:
        raise ValueError(f"--ks {args.ks!r}: expected comma-separated whole numbers, e.g. 1,10,100") from None
    if ks is not None and min(ks) < 1:
        raise ValueError(f"--ks {args.ks!r}: every k must be at least 1")
    labels = args.labels.split(",") if args.labels else None
    paths = write_report([Path(p) for p in args.results], Path(args.output), ks, args.budget, labels)
    sys.stdout.write(f"report: {paths[0]} and {paths[1]}\n")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import gc

    from eval_harness.generate import GenerationStopped, generate_samples

    try:
        added = generate_samples(generate_config(args), args.checkpoint or None, args.output)
    except GenerationStopped as stop:
        log.warning("stopped by %s after %d samples (each whole in %s); run the same command again to resume",
                    stop.reason, stop.added, args.output)
        gc.freeze()  # the process ends next: spare its last collections the heap (~2 s of CPU with megatron loaded)
        return stop.exit_code
    log.info("%d samples added to %s", added, args.output)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from eval_harness.watch import WatchConfig, watch

    try:
        watch(WatchConfig(Path(args.run_dir), generate_config(args), args.interval, args.once, args.workers))
    except Stopped as stop:
        log.warning("stopped by %s: finished checkpoints are recorded in %s/eval/state.json; run the same command "
                    "again to resume", stop, args.run_dir)
        return STOP.exit_code()
    return 0
