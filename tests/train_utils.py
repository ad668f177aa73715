"""Helpers shared by the trainer and launcher tests: a tiny run's config values, its metrics, and running it as a
real process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def values(store: str, run_dir: str, **over: Any) -> dict[str, Any]:
    v: dict[str, Any] = {
        "run_dir": run_dir,
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
                  "vocab_size": 128, "max_position_embeddings": 64},
        "tp": 1, "zero_stage": 1, "micro_batch_size": 2, "train_steps": 5, "seed": 7,
        "data": {"sources": [{"path": store}], "global_batch_size": 4, "seed": 3},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "checkpoint": {"interval": 100, "keep": 2},
        "log": {"interval": 1, "tensorboard": False},
    }
    for key, val in over.items():
        node = v
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return v


def metrics(run_dir: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def launch_module(cmd: list[str], run_dir: Path) -> Any:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", *cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(run_dir.parent / f"{run_dir.name}.log", "w"), start_new_session=True)


def write_config(v: dict[str, Any], path: Path) -> str:
    path.write_text(yaml.safe_dump(v))
    return str(path)


def wait_for_step(run_dir: Path, step: int, proc: Any, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.exists() and any(json.loads(line)["step"] >= step for line in f.read_text().splitlines()):
            return
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl while a run is writing it (0 before the first; a half-written line ignored)."""
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return max(steps)
