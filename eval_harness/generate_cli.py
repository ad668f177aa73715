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
        p.add_argument("--checkpoint", required=True, help="model checkpoint (or a training step-N directory)")
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: the one the checkpoint names)")
    p.add_argument("--data", required=True, help="HumanEval-X directory")
    p.add_argument("--task", default="humaneval-x", choices=["humaneval-x", "translation", "incremental"])
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
    path = Path(path)
    return path / "model" if (path / "model" / "manifest.json").is_file() else path


def make_tasks(args: argparse.Namespace) -> list[Any]:
    from eval_harness.datasets import load_humaneval_x, resolve_languages
    from eval_harness.tasks import generation_tasks, incremental_tasks, translation_tasks

    by_lang = load_humaneval_x(args.data, resolve_languages(args.languages))
    if args.problems:
        by_lang = {lang: probs[:args.problems] for lang, probs in by_lang.items()}
    if args.task == "translation":
        return translation_tasks(by_lang)
    flat = [p for probs in by_lang.values() for p in probs]
    return incremental_tasks(flat) if args.task == "incremental" else generation_tasks(flat)


def generate_samples(args: argparse.Namespace, checkpoint: str | Path, output: str | Path) -> int:
    """Generate the samples ``output`` lacks; returns how many were added."""
    from data_pipeline.tokenizer import CodeTokenizer
    from eval_harness.samples import read_samples
    from eval_harness.stops import truncate
    from megatron_code.checkpoint import load_model, read_manifest
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.parallel import build_parallel_context, single_context

    ckpt = model_dir(checkpoint)
    manifest = read_manifest(ckpt)
    tok_path = args.tokenizer or manifest.get("tokenizer", {}).get("path")
    if not tok_path:
        raise ValueError(f"{ckpt}: the checkpoint names no tokenizer; pass --tokenizer MODEL")
    tok = CodeTokenizer(tok_path)
    tasks = make_tasks(args)
    have = Counter(s["key"] for s in read_samples(output)) if Path(output).exists() else Counter()
    todo = [(t, j) for t in tasks for j in range(have[t.key], args.n)]
    if not todo:
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc = build_parallel_context(world) if world > 1 else single_context()  # every rank a tensor-parallel slice
    model = load_model(ckpt, pc)
    model.eval()
    step = int(manifest.get("step", -1))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    added = 0
    with open(output, "a") as fh:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed + start)
            prompts = [t.prompt for t, _ in batch]

            langs = [t.language for t, _ in batch]

            def stop(i: int, new: list[int], prompts: list[str] = prompts, langs: list[str] = langs) -> bool:
                return truncate(langs[i], prompts[i], tok.decode(new))[1]

            outs = generate(model, [tok.encode(p) for p in prompts], cfg, pad_id=tok.pad_id, eod_id=tok.eod_id,
                            stop=stop, vocab_limit=tok.vocab_size)
            if pc.rank != 0:
                continue
            for (task, _), out in zip(batch, outs, strict=True):
                completion = truncate(task.language, task.prompt, tok.decode(out))[0]
                fh.write(json.dumps({"task_id": task.task_id, "completion": completion, "key": task.key,
                                     "kind": task.kind, "language": task.language,
                                     "source_language": task.source_language, "prefix_lines": task.prefix_lines,
                                     "checkpoint": str(ckpt), "checkpoint_step": step}) + "\n")
                added += 1
            fh.flush()
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
