"""``codegeex eval generate`` as a library: samples from a checkpoint, batched, tensor-parallel aware and resumable
(a rerun generates only the samples each task still lacks). Torch and the model code are imported when generating,
so that this module (and the command line that reads its defaults) loads fast."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common.contracts import CheckpointManifest, PairLayout
from common.logs import progress
from eval_harness.datasets import Problem, load_humaneval_x, load_mbpp, resolve_languages
from eval_harness.samples import read_samples
from eval_harness.tasks import Task, TaskSet, generation_tasks, incremental_tasks, mbpp_tasks, translation_tasks

if TYPE_CHECKING:
    from eval_harness.pair_prompts import Prompter

log = logging.getLogger("codegeex.eval")
PromptFormat = Literal["auto", "plain", "pairs"]  # pairs: the checkpoint's text-to-code pair layout (auto: if it has one)
PrefixLM = Literal["auto", "on", "off"]  # bidirectional attention over the docstring prefix (auto: prefix-code-clm)


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate from a checkpoint, and how to sample it."""

    data: str = ""  # HumanEval-X directory
    mbpp: str = ""  # mbpp.jsonl, for TaskSet.MBPP (its test split, ids 11-510)
    tokenizer: str = ""  # SentencePiece model ("": the one the checkpoint names)
    task: TaskSet = TaskSet.HUMANEVAL_X
    prompt_format: PromptFormat = "auto"
    prefix_lm: PrefixLM = "auto"
    languages: str = "all"
    problems: int = 0  # only the first N problems per language (0: all)
    n: int = 1  # samples per task
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    max_new_tokens: int = 1024
    batch_size: int = 16
    seed: int = 1234


def make_tasks(cfg: GenerateConfig) -> tuple[list[Task], dict[str, Problem]]:
    """The tasks to generate, and their problems by task id."""
    if cfg.task == TaskSet.MBPP:
        if not cfg.mbpp:
            raise ValueError("--task mbpp needs --mbpp PATH (mbpp.jsonl)")
        mbpp = load_mbpp(cfg.mbpp)[:cfg.problems or None]
        return mbpp_tasks(mbpp), {p.task_id: p for p in mbpp}
    if not cfg.data:
        raise ValueError(f"--task {cfg.task} needs --data HUMANEVAL_X_DIR")
    by_lang = load_humaneval_x(cfg.data, resolve_languages(cfg.languages))
    if cfg.problems:
        by_lang = {lang: probs[:cfg.problems] for lang, probs in by_lang.items()}
    flat = [p for probs in by_lang.values() for p in probs]
    problems = {p.task_id: p for p in flat}
    if cfg.task == TaskSet.TRANSLATION:
        return translation_tasks(by_lang), problems
    return (incremental_tasks(flat) if cfg.task == TaskSet.INCREMENTAL else generation_tasks(flat)), problems


def prompt_format(cfg: GenerateConfig, manifest: CheckpointManifest) -> tuple[PairLayout | None, bool]:
    """(the pair layout to prompt with, or None for plain prompts; whether the docstring prefix is bidirectional)."""
    pairs = manifest.pairs
    if cfg.prompt_format == "pairs" and not pairs:
        log.warning("the checkpoint records no pair layout; prompting with docstring_first, no whitespace markers")
    use = cfg.prompt_format == "pairs" or (cfg.prompt_format == "auto" and pairs is not None)
    fmt = pairs or PairLayout()
    prefix = cfg.prefix_lm == "on" or (cfg.prefix_lm == "auto" and manifest.objective == "prefix-code-clm")
    return (fmt if use else None), prefix


def missing_samples(tasks: list[Task], output: str | Path, n: int) -> list[tuple[Task, int]]:
    """(task, sample number) of every sample ``output`` lacks for ``n`` per task."""
    have = Counter(s["key"] for s in read_samples(output)) if Path(output).exists() else Counter()
    return [(t, j) for t in tasks for j in range(have[t.key], n)]


def generate_samples(cfg: GenerateConfig, checkpoint: str | Path, output: str | Path) -> int:
    """Generate the samples ``output`` lacks; returns how many were added."""
    from data_pipeline.tokenizer import CodeTokenizer
    from eval_harness.pair_prompts import Prompter
    from megatron_code.checkpoint import load_model, read_manifest, resolve_model_dir
    from megatron_code.parallel import build_parallel_context, single_context

    ckpt = resolve_model_dir(checkpoint)
    manifest = read_manifest(ckpt)
    tok = CodeTokenizer(manifest.tokenizer_path(cfg.tokenizer, ckpt))
    tasks, problems = make_tasks(cfg)
    fmt, prefix_lm = prompt_format(cfg, manifest)
    prompter = Prompter(tok, problems, fmt)
    todo = missing_samples(tasks, output, cfg.n)
    if not todo:
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc = build_parallel_context(world) if world > 1 else single_context()  # every rank a tensor-parallel slice
    model = load_model(ckpt, pc)
    model.eval()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    added = 0
    bar = progress(total=len(tasks) * cfg.n, initial=len(tasks) * cfg.n - len(todo), desc="generate", unit="sample",
                   disable=pc.rank != 0)
    with open(output, "a") as fh:
        for start in range(0, len(todo), cfg.batch_size):
            batch = [t for t, _ in todo[start:start + cfg.batch_size]]
            encoded, outs = _generate_batch(model, tok, prompter, batch, cfg, cfg.seed + start, prefix_lm)
            if pc.rank != 0:
                continue
            for task, out, enc in zip(batch, outs, encoded, strict=True):
                completion = prompter.completion(task, out, enc[2])[0]
                fh.write(json.dumps(sample_row(task, completion, prompter, str(ckpt), manifest.step)) + "\n")
                added += 1
            fh.flush()
            bar.update(len(batch))
    bar.close()
    return added


def _generate_batch(model: Any, tok: Any, prompter: Prompter, batch: list[Task], cfg: GenerateConfig, seed: int,
                    prefix_lm: bool) -> tuple[list[tuple[list[int], list[int], str]], list[list[int]]]:
    """(each task's encoded prompt, the tokens generated for it), generation ending at each task's stop rule."""
    from megatron_code.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=seed)
    encoded = [prompter.encode(t) for t in batch]

    def stop(i: int, new: list[int]) -> bool:
        return prompter.completion(batch[i], new, encoded[i][2])[1]

    outs = generate(model, [e[0] for e in encoded], sampling, pad_id=tok.pad_id, eod_id=tok.eod_id, stop=stop,
                    vocab_limit=tok.vocab_size, modality=[e[1] for e in encoded], prefix_lm=prefix_lm)
    return encoded, outs


def sample_row(task: Task, completion: str, prompter: Prompter, checkpoint: str, step: int) -> dict[str, Any]:
    """A line of samples.jsonl: the completion and every field the executor and the report read."""
    return {"task_id": task.task_id, "completion": completion, "key": task.key, "kind": task.kind,
            "language": task.language, "source_language": task.source_language, "prefix_lines": task.prefix_lines,
            "prompt_format": "pairs" if prompter.uses_pairs(task) else "plain", "checkpoint": checkpoint,
            "checkpoint_step": step}
