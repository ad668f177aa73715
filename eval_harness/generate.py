"""``codegeex eval generate`` as a library: samples from a checkpoint, batched, tensor-parallel aware and resumable
(a rerun generates only the samples each task still lacks). Torch and the model code are imported when generating,
so that this module (and the command line that reads its defaults) loads fast. SIGINT and SIGTERM stop it between
decoding steps, keeping every finished batch (:class:`GenerationStopped`)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common.contracts import CheckpointManifest, PairLayout
from common.logs import progress
from eval_harness.datasets import Problem, load_humaneval_x, load_mbpp, resolve_languages
from eval_harness.samples import read_samples
from eval_harness.stopping import Stop, Stopped, stop_on_signals
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


class GenerationStopped(Stopped):
    """``generate`` stopped by a signal (its name: :attr:`reason`) after adding :attr:`added` samples, every one of
    them whole in the file; the same command again resumes. :attr:`exit_code`: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, reason: str, added: int, exit_code: int) -> None:
        super().__init__(reason)
        self.reason, self.added, self.exit_code = reason, added, exit_code


def generate_samples(cfg: GenerateConfig, checkpoint: str | Path, output: str | Path) -> int:
    """Generate the samples ``output`` lacks; returns how many were added. ``output`` is appended batch by batch; a
    SIGINT or SIGTERM stops between decoding steps (between batches under tensor parallelism), drops the unfinished
    batch and raises :class:`GenerationStopped`."""
    added = 0
    with stop_on_signals() as stop:
        try:
            for count in _generate_missing(cfg, checkpoint, output, stop):
                added += count
        except Stopped:
            raise GenerationStopped(stop.reason or "a stop on another rank", added, stop.exit_code()) from None
    return added


def _generate_missing(cfg: GenerateConfig, checkpoint: str | Path, output: str | Path, stop: Stop) -> Iterator[int]:
    """Generate and append each batch of missing samples, yielding how many each added (0 on ranks other than 0)."""
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
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pc = build_parallel_context(world) if world > 1 else single_context()  # every rank a tensor-parallel slice
    model = load_model(ckpt, pc)
    model.eval()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    bar = progress(total=len(tasks) * cfg.n, initial=len(tasks) * cfg.n - len(todo), desc="generate", unit="sample",
                   disable=pc.rank != 0)
    interrupt = stop.check if world == 1 else None  # under TP the ranks agree between batches (a collective)
    try:
        with open(output, "a") as fh:
            for start in range(0, len(todo), cfg.batch_size):
                _check_stop(stop, world)
                batch = [t for t, _ in todo[start:start + cfg.batch_size]]
                encoded, outs = _generate_batch(model, tok, prompter, batch, cfg, cfg.seed + start, prefix_lm,
                                                interrupt)
                if pc.rank != 0:
                    yield 0
                    continue
                for task, out, enc in zip(batch, outs, encoded, strict=True):
                    completion = prompter.completion(task, out, enc[2])[0]
                    fh.write(json.dumps(sample_row(task, completion, prompter, str(ckpt), manifest.step)) + "\n")
                fh.flush()
                bar.update(len(batch))
                yield len(batch)
    finally:
        bar.close()


def _check_stop(stop: Stop, world: int) -> None:
    """Raise :class:`Stopped` when a stop was requested; under tensor parallelism when any rank's was, all together
    (so that no rank is left waiting in a collective)."""
    if world == 1:
        stop.check()
        return
    import torch
    import torch.distributed as dist

    from megatron_code.parallel import collective_device

    flag = torch.tensor([float(stop.is_set())], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise Stopped(stop.reason)


def _generate_batch(model: Any, tok: Any, prompter: Prompter, batch: list[Task], cfg: GenerateConfig, seed: int,
                    prefix_lm: bool, interrupt: Callable[[], None] | None = None,
                    ) -> tuple[list[tuple[list[int], list[int], str]], list[list[int]]]:
    """(each task's encoded prompt, the tokens generated for it), generation ending at each task's stop rule;
    ``interrupt`` is called before each decoding step (see :func:`megatron_code.generation.generate`)."""
    from megatron_code.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy, temperature=cfg.temperature,
                              top_p=cfg.top_p, seed=seed)
    encoded = [prompter.encode(t) for t in batch]

    def stop(i: int, new: list[int]) -> bool:
        return prompter.completion(batch[i], new, encoded[i][2])[1]

    outs = generate(model, [e[0] for e in encoded], sampling, pad_id=tok.pad_id, eod_id=tok.eod_id, stop=stop,
                    vocab_limit=tok.vocab_size, modality=[e[1] for e in encoded], prefix_lm=prefix_lm,
                    interrupt=interrupt)
    return encoded, outs


def sample_row(task: Task, completion: str, prompter: Prompter, checkpoint: str, step: int) -> dict[str, Any]:
    """A line of samples.jsonl: the completion and every field the executor and the report read."""
    return {"task_id": task.task_id, "completion": completion, "key": task.key, "kind": task.kind,
            "language": task.language, "source_language": task.source_language, "prefix_lines": task.prefix_lines,
            "prompt_format": "pairs" if prompter.uses_pairs(task) else "plain", "checkpoint": checkpoint,
            "checkpoint_step": step}
