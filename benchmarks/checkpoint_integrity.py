"""Checkpoint integrity and elastic resume, measured: what digests add to a save, and what a resume on another
layout costs against a plain one.

1. One rank saves the real trainer's checkpoint of a preset (``--preset``, fp32, ZeRO off: DP=1) ``--repeats``
   times; the trainer's own log gives each save's write time and digest time. The same files are then hashed again
   from the page cache with xxh3-128 (what the trainer uses) and with sha256: seconds per GB each.
2. Two gloo ranks train ``--steps`` steps at TP1 x DP2 and save; then resume from that checkpoint at TP1 x DP2
   (DeepSpeed's own files: a plain resume) and at TP2 x DP1 (model resharded, optimizer state rebuilt: an elastic
   resume), timing build + resume on rank 0.

Usage: python -m benchmarks.checkpoint_integrity [--preset pangu-coder-100m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.model_utils import synthetic_store
from tests.train_utils import values


def preset_values(preset: str, store: str, run: str, **over: Any) -> dict[str, Any]:
    from megatron_code.config import load_preset

    model = load_preset(preset, ["hidden_dropout=0", "attention_dropout=0"])
    v = values(store, run, **{"micro_batch_size": 2, "train_steps": 1, "log__interval": 1, **over})
    v["model"] = {k: getattr(model, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                 "ffn_hidden_size", "vocab_size", "max_position_embeddings")}
    return v


class _Saves(logging.Handler):
    """The trainer's save lines: (GB, write s, digest s)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[float, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"([\d.]+) GB written in ([\d.]+) s, digests ([\d.]+) s", record.getMessage())
        if m:
            self.rows.append((float(m[1]), float(m[2]), float(m[3])))


def save_cost(preset: str, store: str, work: Path, repeats: int) -> dict[str, Any]:
    from common.config import load_config
    from common.integrity import checksum, list_files
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import train

    saves = _Saves()
    logging.getLogger("codegeex.checkpoint").addHandler(saves)
    logging.getLogger("codegeex.checkpoint").setLevel(logging.INFO)
    for i in range(repeats):
        v = preset_values(preset, store, str(work / f"save{i}"), checkpoint__resume="none")
        train(load_config(TrainConfig, values=v), ["benchmark"])
    step = work / f"save{repeats - 1}" / "checkpoints" / "step-00000001"
    names = list_files(step)
    size = sum((step / n).stat().st_size for n in names)
    rehash = {}
    for algorithm in ("xxh3_128", "sha256"):
        t = time.perf_counter()
        for n in names:
            checksum(step / n, algorithm)
        rehash[algorithm] = (time.perf_counter() - t) / (size / 1e9)
    gb, write, digest = (statistics.median(c) for c in zip(*saves.rows))
    return {"checkpoint_gb": gb, "write_s": write, "digest_s": digest, "digest_share_of_save": digest / (write + digest),
            "rehash_s_per_gb": rehash, "sha256_share_of_save_estimated": rehash["sha256"] * gb / (write + rehash["sha256"] * gb),
            "saves": saves.rows}


def _resume_times(store: str, work: str, preset: str) -> dict[str, float]:
    """On 2 ranks: save at TP1xDP2, then time build+resume at TP1xDP2 (plain) and TP2xDP1 (elastic)."""
    import torch.distributed as dist

    from common.config import load_config
    from megatron_code.train_config import TrainConfig
    from megatron_code.training import ResumePlan, build, resume_point

    base = preset_values(preset, store, f"{work}/run", micro_batch_size=1, train_steps=2, data__global_batch_size=2)
    from megatron_code.training import train

    train(load_config(TrainConfig, values=base), ["benchmark"])
    out = {}
    for name, tp in (("plain", 1), ("elastic", 2), ("plain_again", 1), ("elastic_again", 2)):
        cfg = load_config(TrainConfig, values={**base, "tp": tp, "train_steps": 4})
        dist.barrier()
        t = time.perf_counter()
        plan = ResumePlan()
        pc, model, engine, sampler = build(cfg, plan)
        assert plan.elastic == (tp == 2), (name, plan)
        resume_point(plan, engine, model, sampler)
        dist.barrier()
        out[name] = time.perf_counter() - t
        del engine, model
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pangu-coder-100m")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from tests.dist import run_ranks

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        store = str(synthetic_store(work / "store", windows=16, seq_len=64, vocab=512))
        cost = save_cost(args.preset, store, work, args.repeats)
        times = run_ranks(_resume_times, 2, store, str(work / "resume"), args.preset)[0]
    result = {"preset": args.preset, "machine": platform.processor() or platform.machine(), **cost,
              "resume_s": times, "elastic_over_plain": (times["elastic"] + times["elastic_again"])
              / (times["plain"] + times["plain_again"])}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
