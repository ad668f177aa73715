"""``codegeex eval watch`` as a library: every checkpoint of a training run evaluated once as it appears (generate,
execute, report over all). Restartable: finished steps are listed in RUN_DIR/eval/state.json, an unfinished one
resumes its samples and results files."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from common.contracts import MANIFEST
from eval_harness.execute import ExecuteConfig, execute_file
from eval_harness.generate import GenerateConfig, generate_samples
from eval_harness.report import write_report
from eval_harness.stopping import stop_on_signals

log = logging.getLogger("codegeex.eval")


@dataclass(frozen=True)
class WatchConfig:
    """The run to watch, how to generate for each checkpoint, and how often to look."""

    run_dir: Path  # RUN_DIR/checkpoints/step-N
    generate: GenerateConfig
    interval: float = 60.0  # seconds between looks for new checkpoints
    once: bool = False  # evaluate what is there, then return
    workers: int = 0  # parallel programs (0: the cores)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's step-N directories that hold a complete checkpoint, in step order."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "model" / MANIFEST).is_file() or (p / MANIFEST).is_file())


def evaluate_new_checkpoints(cfg: WatchConfig) -> list[str]:
    """RUN_DIR/eval/step-N/{samples,results}.jsonl for each checkpoint not evaluated yet, then RUN_DIR/eval/report
    over all; returns the steps evaluated."""
    root = cfg.run_dir / "eval"
    state_path = root / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"done": []}
    new = [p for p in checkpoints(cfg.run_dir) if p.name not in state["done"]]
    for ckpt in new:
        out = root / ckpt.name
        log.info("evaluating %s", ckpt)
        generate_samples(cfg.generate, ckpt, out / "samples.jsonl")
        execute_file(ExecuteConfig(out / "samples.jsonl", out / "results.jsonl", data=cfg.generate.data,
                                   workers=cfg.workers))
        state["done"].append(ckpt.name)
        root.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state) + "\n")
        results = [root / d / "results.jsonl" for d in state["done"] if (root / d / "results.jsonl").exists()]
        md, _ = write_report(results, root / "report")  # ks: 1, 10, 100 where n allows, and n
        log.info("report: %s", md)
    return [p.name for p in new]


def watch(cfg: WatchConfig) -> None:
    """Evaluate new checkpoints every ``cfg.interval`` seconds (once, with ``cfg.once``); a SIGINT or SIGTERM stops
    it (:class:`~eval_harness.stopping.Stopped`), keeping what finished."""
    with stop_on_signals() as stop:
        while True:
            evaluate_new_checkpoints(cfg)
            if cfg.once:
                return
            sys.stderr.flush()
            if stop.wait(cfg.interval):
                stop.check()
