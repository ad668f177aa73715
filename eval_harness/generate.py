"""``codegeex eval generate`` as a library: samples from a native checkpoint, a Hugging Face model or vLLM
(:mod:`eval_harness.backends`), batched, resumable (a rerun generates only the samples each task still lacks) and
spread over data-parallel ranks under torchrun: each data-parallel rank takes a disjoint slice of the missing
samples, and its tensor-parallel rank 0 appends its rows to the one samples file under an exclusive lock. Every row
records its sample number (``sample``), so what is missing is known however the ranks' rows interleave. Torch and
the model code are imported when generating, so that this module (and the command line that reads its defaults)
loads fast. SIGINT and SIGTERM stop it between decoding steps, keeping every finished batch
(:class:`GenerationStopped`)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.logs import progress
from eval_harness.datasets import Problem, load_humaneval_x, load_mbpp, resolve_languages
from eval_harness.gen_config import BackendName, Dtype, GenerateConfig, PrefixLM, PromptFormat, prompt_format
from eval_harness.samples import read_samples
from eval_harness.stopping import Stop, Stopped, stop_on_signals
from eval_harness.tasks import Task, TaskSet, generation_tasks, incremental_tasks, mbpp_tasks, translation_tasks

if TYPE_CHECKING:
    from eval_harness.backends import Generator

log = logging.getLogger("codegeex.eval")
__all__ = ["BackendName", "Dtype", "GenerateConfig", "GenerationStopped", "PrefixLM", "PromptFormat",
           "generate_samples", "make_tasks", "missing_samples", "prompt_format", "sample_seed"]


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


def sample_seed(seed: int, key: str, number: int) -> int:
    """The seed of sample ``number`` of task ``key``: the same on every rank, in every batch and every rerun."""
    digest = hashlib.sha256(f"{seed}/{key}/{number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def missing_samples(tasks: list[Task], output: str | Path, n: int) -> list[tuple[Task, int]]:
    """(task, sample number) of every sample ``output`` lacks for ``n`` per task. Rows that record their number
    (``sample``) hold it; rows without one (other tools' files) take the lowest numbers still free."""
    have: dict[str, set[int]] = defaultdict(set)
    unnumbered: Counter[str] = Counter()
    for s in read_samples(output) if Path(output).exists() else []:
        number = s.get("sample")
        if type(number) is int and number >= 0:
            have[s["key"]].add(number)
        else:
            unnumbered[s["key"]] += 1
    todo = []
    for t in tasks:
        free = [j for j in range(n) if j not in have[t.key]]
        todo += [(t, j) for j in free[unnumbered[t.key]:]]
    return todo


def repair_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a writer killed mid-line) from a samples file; holds its lock."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: cutting a torn last line (%d bytes) left by a killed writer", path, len(data) - keep)
            fh.truncate(keep)


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole rows under an exclusive lock (data-parallel writers share the file), flushed before unlocking."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class GenerationStopped(Stopped):
    """``generate`` stopped by a signal (its name: :attr:`reason`) after adding :attr:`added` samples, every one of
    them whole in the file; the same command again resumes. :attr:`exit_code`: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, reason: str, added: int, exit_code: int) -> None:
        super().__init__(reason)
        self.reason, self.added, self.exit_code = reason, added, exit_code


def generate_samples(cfg: GenerateConfig, checkpoint: str | Path | None, output: str | Path) -> int:
    """Generate the samples ``output`` lacks; returns how many this process added. ``output`` is appended batch by
    batch; a SIGINT or SIGTERM stops between decoding steps (between batches when several processes run), drops the
    unfinished batch and raises :class:`GenerationStopped`. ``checkpoint``: the native backend's."""
    cfg.validate()
    added = 0
    with stop_on_signals() as stop:
        try:
            for count in _generate_missing(cfg, checkpoint, output, stop):
                added += count
        except Stopped:
            raise GenerationStopped(stop.reason or "a stop on another rank", added, stop.exit_code()) from None
    return added


def my_slice(todo: list[Any], dp_rank: int, dp_size: int) -> tuple[list[Any], int]:
    """(this data-parallel rank's contiguous slice of ``todo``, the longest slice's length)."""
    chunk = -(-len(todo) // dp_size)
    return todo[dp_rank * chunk:(dp_rank + 1) * chunk], chunk


def _generate_missing(cfg: GenerateConfig, checkpoint: str | Path | None, output: str | Path,
                      stop: Stop) -> Iterator[int]:
    """Generate and append each batch of this rank's missing samples, yielding how many each added."""
    from eval_harness.backends import load_generator

    output = Path(output)
    tasks, problems = make_tasks(cfg)
    gen = load_generator(cfg, checkpoint, problems)
    world = gen.shard.world_size
    output.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(output)
    todo = missing_samples(tasks, output, cfg.n)
    _barrier(world)  # every rank has read the file before any appends to it
    mine, longest = my_slice(todo, gen.shard.dp_rank, gen.shard.dp_size)
    if not todo:
        return
    total = len(tasks) * cfg.n
    bar = progress(total=total, initial=total - len(todo), desc="generate", unit="sample",
                   disable=int(os.environ.get("RANK", "0")) != 0)
    interrupt = stop.check if world == 1 else None  # with several processes, they agree between batches
    try:
        for start in range(0, longest, cfg.batch_size):
            _check_stop(stop, world)
            part = mine[start:start + cfg.batch_size]
            if not part:  # this rank's slice is shorter: it still joins every stop agreement
                yield 0
                continue
            batch = [t for t, _ in part]
            completions = gen.complete(batch, [sample_seed(cfg.seed, t.key, j) for t, j in part], interrupt)
            if gen.shard.writer:
                append_rows(output, [sample_row(t, j, c, gen) for (t, j), c in zip(part, completions, strict=True)])
            bar.update(len(part) * gen.shard.dp_size)
            yield len(part) if gen.shard.writer else 0
    finally:
        bar.close()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_stop(stop: Stop, world: int) -> None:
    """Raise :class:`Stopped` when a stop was requested; with several processes when any one's was, all together
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


def sample_row(task: Task, number: int, completion: str, gen: Generator) -> dict[str, Any]:
    """A line of samples.jsonl: the completion and every field the executor and the report read."""
    uses_pairs = gen.prompter.uses_pairs(task)
    return {"task_id": task.task_id, "completion": completion, "key": task.key, "kind": task.kind,
            "language": task.language, "source_language": task.source_language, "prefix_lines": task.prefix_lines,
            "sample": number, "prompt_format": "pairs" if uses_pairs else "plain", "backend": gen.name,
            "checkpoint": gen.source, "checkpoint_step": gen.step}
