"""Launch-time validation time: CodeGeeX-13B (configs/model/codegeex-13b.yaml) at 1,536 ranks, TP=8 x DP=192,
ZeRO-2, micro-batch 16, full recomputation, global batch 3,072 x 2,048 tokens: the checks of launch.validate.check_job
(world, TP splits, batch, the store and its tokenizer, writable directories, memory per rank against an H100-80, then
the model's shapes on fake process groups with the model on the meta device), timed as the operator runs them:

    codegeex plan --validate CONFIG --world-size 1536 --gpu h100-80gb
    codegeex launch slurm CONFIG --nodes 192 --gpus-per-node 8 --gpu h100-80gb --dry-run

each a fresh process (interpreter start and imports included), ``--runs`` times; the median of each is printed as
JSON. The store is a synthetic one of 2,048-token windows in a temporary directory (what is checked of it does not
depend on its size), with a tokenizer file beside it that its manifest names.

Usage: python -m benchmarks.validate_time [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.job_files import codegeex_13b_job

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = str(codegeex_13b_job(root))
        commands = {
            "plan --validate": ["plan", "--validate", config, "--world-size", "1536", "--gpu", "h100-80gb"],
            "launch slurm --dry-run": ["launch", "slurm", config, "--nodes", "192", "--gpus-per-node", "8",
                                       "--gpu", "h100-80gb", "--dry-run"],
        }
        times = {name: [timed(argv, root) for _ in range(args.runs)] for name, argv in commands.items()}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": args.runs,
              **{name: {"median_s": round(statistics.median(t), 2), "all_s": [round(x, 2) for x in t]}
                 for name, t in times.items()}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
