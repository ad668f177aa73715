"""``codegeex eval generate`` (samples from a checkpoint, resumable) and ``codegeex eval watch`` (every new
checkpoint of a run: generate, execute, score, report)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common.contracts import CheckpointManifest, PairLayout
from common.logs import progress

log = logging.getLogger("codegeex.eval")


def register_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="samples.jsonl from a checkpoint (batched, TP-aware, resumable)")
    _gen_args(p)
    p.add_argument("--output", required=True, help="samples.jsonl (a rerun adds only the missing samples)")
    p.set_defaults(func=cmd_generate)


def register_watch(sub: Any) -> None:
    p = sub.add_parser("watch", help="evaluate each new checkpoint of a training run as it appears")
    p.add_argument("run_dir", help="the training run directory (RUN_DIR/checkpoints/step-N)")
    _gen_args(p, checkpoint=False)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between looks for new checkpoints")
    p.add_argument("--once", action="store_true", help="evaluate what is there, then exit")
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(func=cmd_watch)


def _gen_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="a model, step-N, checkpoints or run directory")
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: the one the checkpoint names)")
    p.add_argument("--data", default="", help="HumanEval-X directory")
    p.add_argument("--mbpp", default="", help="mbpp.jsonl (for --task mbpp; the test split, ids 11-510)")
    p.add_argument("--task", default="humaneval-x", choices=["humaneval-x", "translation", "incremental", "mbpp"])
    p.add_argument("--prompt-format", default="auto", choices=["auto", "plain", "pairs"],
                   help="pairs: Python and MBPP prompts in the text-to-code pair layout of the checkpoint's data "
                        "(auto: when the checkpoint was trained on pairs)")
    p.add_argument("--prefix-lm", default="auto", choices=["auto", "on", "off"],
                   help="bidirectional attention over the prompt's docstring prefix (auto: when the checkpoint was "
                        "trained with prefix-code-clm)")
    p.add_argument("--languages", default="all")
    p.add_argument("--problems", type=int, default=0, help="only the first N problems per language (0: all)")
    p.add_argument("--n", type=int, default=1, help="samples per task")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)


def model_dir(path: str | Path) -> Path:
    """A checkpoint given as a model, step-N, checkpoints or run directory."""
    from megatron_code.checkpoint import resolve_model_dir

    return resolve_model_dir(path)


def make_tasks(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The tasks to generate, and their problems by task id."""
    from eval_harness.datasets import load_humaneval_x, load_mbpp, resolve_languages
    from eval_harness.tasks import generation_tasks, incremental_tasks, mbpp_tasks, translation_tasks

    if args.task == "mbpp":
        if not args.mbpp:
            raise ValueError("--task mbpp needs --mbpp PATH (mbpp.jsonl)")
        mbpp = load_mbpp(args.mbpp)[:args.problems or None]
        return mbpp_tasks(mbpp), {p.task_id: p for p in mbpp}
    if not args.data:
        raise ValueError(f"--task {args.task} needs --data HUMANEVAL_X_DIR")
    by_lang = load_humaneval_x(args.data, resolve_languages(args.languages))
    if args.problems:
        by_lang = {lang: probs[:args.problems] for lang, probs in by_lang.items()}
    flat = [p for probs in by_lang.values() for p in probs]
    problems = {p.task_id: p for p in flat}
    if args.task == "translation":
        return translation_tasks(by_lang), problems
    return (incremental_tasks(flat) if args.task == "incremental" else generation_tasks(flat)), problems


def prompt_format(args: argparse.Namespace, manifest: CheckpointManifest) -> tuple[PairLayout | None, bool]:
    """(the pair layout to prompt with, or None for plain prompts; whether the docstring prefix is bidirectional)."""
    pairs = manifest.pairs
    if args.prompt_format == "pairs" and not pairs:
        log.warning("the checkpoint records no pair layout; prompting with docstring_first, no whitespace markers")
    use = args.prompt_format == "pairs" or (args.prompt_format == "auto" and pairs is not None)
    fmt = pairs or PairLayout()
    prefix = args.prefix_lm == "on" or (args.prefix_lm == "auto" and manifest.objective == "prefix-code-clm")
    return (fmt if use else None), prefix


def generate_samples(args: argparse.Namespace, checkpoint: str | Path, output: str | Path) -> int:
    """Generate the samples ``output`` lacks; returns how many were added."""
    from data_pipeline.tokenizer import CodeTokenizer
    from eval_harness.pair_prompts import Prompter
    from eval_harness.samples import read_samples
    from megatron_code.checkpoint import load_model, read_manifest
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.parallel import build_parallel_context, single_context

    ckpt = model_dir(checkpoint)
    manifest = read_manifest(ckpt)
    tok = CodeTokenizer(manifest.tokenizer_path(args.tokenizer, ckpt))
    tasks, problems = make_tasks(args)
    fmt, prefix_lm = prompt_format(args, manifest)
    prompter = Prompter(tok, problems, fmt)  # eval_harness.pair_prompts
    have = Counter(s["key"] for s in read_samples(output)) if Path(output).exists() else Counter()
    todo = [(t, j) for t in tasks for j in range(have[t.key], args.n)]
    if not todo:
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc = build_parallel_context(world) if world > 1 else single_context()  # every rank a tensor-parallel slice
    model = load_model(ckpt, pc)
    model.eval()
    step = manifest.step
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    added = 0
    bar = progress(total=len(tasks) * args.n, initial=len(tasks) * args.n - len(todo), desc="generate", unit="sample",
                   disable=pc.rank != 0)
    with open(output, "a") as fh:
        for start in range(0, len(todo), args.batch_size):
            batch = [t for t, _ in todo[start:start + args.batch_size]]
            cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed + start)
            encoded = [prompter.encode(t) for t in batch]

            def stop(i: int, new: list[int], batch: list[Any] = batch, encoded: list[Any] = encoded) -> bool:
                return prompter.completion(batch[i], new, encoded[i][2])[1]

            outs = generate(model, [e[0] for e in encoded], cfg, pad_id=tok.pad_id, eod_id=tok.eod_id, stop=stop,
                            vocab_limit=tok.vocab_size, modality=[e[1] for e in encoded], prefix_lm=prefix_lm)
            if pc.rank != 0:
                continue
            for task, out, enc in zip(batch, outs, encoded, strict=True):
                fh.write(json.dumps({"task_id": task.task_id, "completion": prompter.completion(task, out, enc[2])[0],
                                     "key": task.key, "kind": task.kind, "language": task.language,
                                     "source_language": task.source_language, "prefix_lines": task.prefix_lines,
                                     "prompt_format": "pairs" if prompter.uses_pairs(task) else "plain",
                                     "checkpoint": str(ckpt), "checkpoint_step": step}) + "\n")
                added += 1
            fh.flush()
            bar.update(len(batch))
    bar.close()
    return added


def cmd_generate(args: argparse.Namespace) -> int:
    added = generate_samples(args, args.checkpoint, args.output)
    log.info("%d samples added to %s", added, args.output)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Each checkpoint once: RUN_DIR/eval/step-N/{samples,results}.jsonl, then RUN_DIR/eval/report over all.
    Restartable: finished steps are listed in RUN_DIR/eval/state.json, unfinished ones resume their files."""
    from eval_harness.cli import execute_file
    from eval_harness.report import write_report

    run = Path(args.run_dir)
    root = run / "eval"
    state_path = root / "state.json"
    while True:
        state = json.loads(state_path.read_text()) if state_path.exists() else {"done": []}
        steps = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "model" / "manifest.json").is_file()
                       or (p / "manifest.json").is_file())
        new = [p for p in steps if p.name not in state["done"]]
        for ckpt in new:
            out = root / ckpt.name
            log.info("evaluating %s", ckpt)
            generate_samples(args, ckpt, out / "samples.jsonl")
            execute_file(str(out / "samples.jsonl"), args.data, "", str(out / "results.jsonl"), args.workers)
            state["done"].append(ckpt.name)
            root.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state) + "\n")
            results = [root / d / "results.jsonl" for d in state["done"] if (root / d / "results.jsonl").exists()]
            md, _ = write_report(results, root / "report", [1, 10, 100])
            log.info("report: %s", md)
        if args.once:
            return 0
        sys.stderr.flush()
        time.sleep(args.interval)
