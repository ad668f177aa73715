"""What observability costs a training step (issue 17): per-rank step times and W&B offline, side by side.

Two gloo ranks train the tests' tiny model (TP=1 x DP=2, ZeRO-1) for ``--steps`` steps in each configuration, side by
side in ``--rounds`` rounds (each round runs every configuration once, in a rotated order), one process per rank:
everything off (no per-rank step times, W&B disabled, no flight recorder), per-rank
step times alone, W&B offline alone, and everything on. ``log.interval=1``: the step-time all-gather and its host read
run every step, the worst case (the default interval, 10, gathers a tenth as often). Figures: the median of
metrics.jsonl's ``step_time_s`` (rank 0's wall time per step), the first 3 steps left out, per run; then the median
over the rounds, and its ratio to everything off. On a shared machine these ratios move more with the load than with
the configuration, so the added work is also timed directly, on the same ranks: the step-time gather (all-gather and
host read) and one W&B ``log`` of a metrics line, each the mean of many calls, against the all-off step time.

Usage: python -m benchmarks.observe_overhead [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from tests.dist import run_ranks
from tests.model_utils import synthetic_store
from tests.train_utils import values

CASES = {
    "all off": {"log__rank_step_times": False, "faults__flight_recorder": False},
    "per-rank step times": {"log__rank_step_times": True, "faults__flight_recorder": False},
    "W&B offline": {"log__rank_step_times": False, "faults__flight_recorder": False,
                    "log__wandb": {"mode": "offline"}},
    "all on (step times, W&B offline, flight recorder)": {"log__wandb": {"mode": "offline"}},
}


def _runs(configs: list[dict[str, Any]]) -> list[float]:
    import torch.distributed as dist

    from common.config import load_config
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train

    medians = []
    for v in configs:
        train(load_config(TrainConfig, values=copy.deepcopy(v)), ["benchmark"])
        if dist.get_rank() == 0:
            rows = [json.loads(x) for x in (Path(v["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            medians.append(statistics.median(r["step_time_s"] for r in rows[3:]))
    return medians + _unit_costs(configs[0])


def _unit_costs(v: dict[str, Any], n: int = 300) -> list[float]:
    """Seconds per call of the step-time gather (every rank) and of a W&B offline log (rank 0)."""
    import time

    import torch.distributed as dist

    from common.config import load_config
    from megatron_code.observe import StepTimes, WandbRun
    from megatron_code.parallel import ParallelContext
    from megatron_code.train_config import TrainConfig

    rank = dist.get_rank()
    times = StepTimes(ParallelContext(1, 0, 2, rank, None, None, rank, 2), straggler_ratio=0)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(n):
        times.gather(0)
    gather = (time.perf_counter() - started) / n
    if rank != 0:
        return [gather, 0.0]
    cfg = load_config(TrainConfig, values={**copy.deepcopy(v), "log": {"wandb": {"mode": "offline"}},
                                           "run_dir": v["run_dir"] + "-wandb"})
    line = json.loads((Path(v["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    run = WandbRun(cfg, 0)
    started = time.perf_counter()
    for step in range(1, 10 * n + 1):
        run.log(step, {k: x for k, x in line.items() if k != "step"})
    wandb_log = (time.perf_counter() - started) / (10 * n)
    run.close()
    return [gather, wandb_log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = list(CASES)
    order = [names[(r + i) % len(names)] for r in range(args.rounds) for i in range(len(names))]
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "store", windows=4 * args.steps + 8, seq_len=32)
        configs = [values(store, f"{tmp}/run-{i}", train_steps=args.steps, micro_batch_size=1, log__interval=1,
                          checkpoint__interval=10**9, checkpoint__resume="none", **CASES[name])
                   for i, name in enumerate(order)]
        *medians, gather, wandb_log = run_ranks(_runs, 2, configs, timeout=3600)[0]
    per_case = {name: statistics.median(m for n, m in zip(order, medians) if n == name) for name in names}
    base = per_case[names[0]]
    print(f"# {platform.machine()}, torch {torch.__version__}, 2 gloo ranks, {args.steps} steps, log.interval=1, "
          f"{args.rounds} rounds")
    print("| configuration | median step time (runs) | ratio to all off |")
    print("|---|---|---|")
    for name in names:
        runs = ", ".join(f"{m * 1e3:.0f}" for n, m in zip(order, medians) if n == name)
        print(f"| {name} | {per_case[name] * 1e3:.1f} ms ({runs}) | {per_case[name] / base:.3f} |")
    print(f"step-time gather: {gather * 1e6:.0f} us per logging step ({gather / base:.2%} of an all-off step); "
          f"W&B offline log: {wandb_log * 1e6:.0f} us per step ({wandb_log / base:.2%})")


if __name__ == "__main__":
    main()
