"""``codegeex eval generate`` in one process against TP=2 x DP=2 (``codegeex launch local --nproc 4 -- eval
generate --tp 2``) on the same checkpoint, prompts and sampling: wall time of each command (start-up and model load
included), samples/s, and how many samples are identical (every sample has its own seeded stream, so all of them
but a draw that lands within rounding of a CDF boundary: TP=2 sums partial products in another order).

    python -m benchmarks.generation_parallel --preset tiny --problems 8 --n 4 --json runs/gen_parallel.json

The checkpoint has random weights and the tokenizer is trained on the embedded default corpus, in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def checkpoint(work: Path, preset: str) -> Path:
    """A random checkpoint of ``preset`` with a tokenizer of 8000 pieces (built once in ``work``)."""
    tok = work / "tokenizer.model"
    if not tok.exists():
        subprocess.run([sys.executable, "-m", "launch.cli", "data", "tokenizer", "--input", "default", "--output",
                        str(work / "tokenizer"), "--vocab-size", "8000", "max_input_mb_per_language=2"], check=True,
                       cwd=REPO)
    ckpt = work / f"ckpt-{preset}"
    if not (ckpt / "manifest.json").exists():
        import torch

        from common.contracts import TokenizerRecord
        from data_pipeline.tokenizer import CodeTokenizer
        from megatron_code.checkpoint import save_checkpoint
        from megatron_code.config import load_preset
        from megatron_code.model import CodeGeeXModel
        from megatron_code.parallel import single_context

        size = CodeTokenizer(tok).vocab_size
        cfg = load_preset(preset, [f"vocab_size={max(size, 8192)}", "hidden_dropout=0", "attention_dropout=0"])
        torch.manual_seed(0)
        save_checkpoint(ckpt, CodeGeeXModel(cfg, single_context()), 1, TokenizerRecord(path=str(tok), vocab_size=size))
    return ckpt


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def samples(path: Path) -> dict[tuple[str, int], str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["key"], r["sample"]): r["completion"] for r in rows}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, args.preset)
    gen = ["eval", "generate", "--checkpoint", str(ckpt), "--data", args.data, "--languages", args.languages,
           "--problems", str(args.problems), "--n", str(args.n), "--max-new-tokens", str(args.new_tokens),
           "--batch-size", str(args.batch_size), "--temperature", "0.8", "--top-p", "0.95"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result: dict[str, Any] = {"preset": args.preset, "cores": os.cpu_count(), "samples": 0}
    for name, launch in (("one_process", [sys.executable, "-m", "launch.cli"]),
                         ("tp2_dp2", [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", "4", "--"])):
        out = work / f"{name}.jsonl"
        out.unlink(missing_ok=True)
        extra = ["--tp", "2"] if name == "tp2_dp2" else []
        result[name] = {"seconds": timed([*launch, *gen, *extra, "--output", str(out)], env)}
        result["samples"] = len(samples(out))
        result[name]["samples_per_s"] = result["samples"] / result[name]["seconds"]
    one, spread = samples(work / "one_process.jsonl"), samples(work / "tp2_dp2.jsonl")
    result["identical_samples"] = sum(spread.get(k) == v for k, v in one.items())  # of result["samples"]
    result["ratio"] = result["one_process"]["seconds"] / result["tp2_dp2"]["seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "humaneval-x"))
    p.add_argument("--languages", default="python,cpp")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work", default="/tmp/codegeex-gen-parallel")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    result = measure(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), result)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
