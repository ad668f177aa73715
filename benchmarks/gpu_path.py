"""GPU-path figures measurable on a CPU: host syncs, and what sequence parallelism saves.

1. Host syncs (tests/device_audit.HostSyncCounter): in the model's forward + backward (per layer: the difference
   between 2 and 6 layers, divided by 4), in one optimizer step of the real trainer (DP=1, no ZeRO: the trainer's own
   path) and per generated token.
2. Sequence parallelism at TP=2 (two gloo ranks): the bytes autograd keeps for backward with and without it, for a
   350M-wide model, against the planner's formula (megatron_code.flops.activation_bytes).

Usage: python benchmarks/gpu_path.py [--seq-len 512] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_code.config import ModelConfig, load_preset  # noqa: E402

WIDE = ["num_layers=4", "hidden_dropout=0", "attention_dropout=0", "vocab_size=4096", "max_position_embeddings=1024"]


def model_syncs(layers: int) -> int:
    from megatron_code.model import CodeGeeXModel
    from megatron_code.objectives import lm_loss, prepare_batch
    from megatron_code.parallel import single_context
    from tests.device_audit import HostSyncCounter
    from tests.model_utils import packed_batch, tiny_config

    pc = single_context()
    model = CodeGeeXModel(tiny_config(num_layers=layers, hidden_dropout=0.1, attention_dropout=0.1), pc)
    model.set_activation_checkpointing("selective")
    with HostSyncCounter() as counter:
        inp = prepare_batch(packed_batch())
        logits, _ = model(inp.tokens, inp.position_ids, inp.mask)
        lm_loss(logits, inp, pc)[0].backward()
    return counter.count


def trainer_syncs(tmp: Path) -> list[int]:
    import megatron_code.training as training
    from common.config import load_config
    from megatron_code.train_config import TrainConfig
    from tests.device_audit import HostSyncCounter
    from tests.model_utils import synthetic_store
    from tests.train_utils import values

    store = synthetic_store(tmp / "store", windows=32, seq_len=32)
    counts: list[int] = []
    real = training.train_step

    def counted(*a: Any, **k: Any) -> Any:
        with HostSyncCounter() as c:
            out = real(*a, **k)
        counts.append(c.count)
        return out

    training.train_step = counted
    try:
        training.train(load_config(TrainConfig, values=values(store, str(tmp / "run"), train_steps=5)), ["bench"])
    finally:
        training.train_step = real
    return counts


def generation_syncs(tokens: int) -> int:
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from tests.device_audit import HostSyncCounter
    from tests.model_utils import tiny_config

    model = CodeGeeXModel(tiny_config(), single_context())
    with HostSyncCounter() as c:
        generate(model, [[5, 6, 7, 8], [9, 10]], SamplingConfig(max_new_tokens=tokens), pad_id=0)
    return c.count


def _memory_rank(rank: int, port: int, cfg: ModelConfig, batch: int, seq: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import dataclasses

    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import build_parallel_context
    from tests.test_flops import saved_bytes

    pc = build_parallel_context(2)
    out = {}
    for sp in (False, True):
        torch.manual_seed(0)
        model = CodeGeeXModel(dataclasses.replace(cfg, sequence_parallel=sp), pc)
        out[sp] = saved_bytes(model, batch, seq)
    if rank == 0:
        queue.put(out)
    torch.distributed.destroy_process_group()


def sp_memory(cfg: ModelConfig, batch: int, seq: int) -> dict[bool, int]:
    from tests.dist import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_memory_rank, args=(r, port, cfg, batch, seq, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return dict(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from megatron_code.flops import activation_bytes

    two, six = model_syncs(2), model_syncs(6)
    with tempfile.TemporaryDirectory() as tmp:
        steps = trainer_syncs(Path(tmp))
    print("| where | host syncs |\n|---|---|")
    print(f"| model forward + backward, 2 layers / 6 layers (dropout, selective recompute) | {two} / {six} |")
    print(f"| per layer | {(six - two) / 4:g} |")
    print(f"| per optimizer step (trainer, 5 steps) | {', '.join(map(str, steps))} |")
    print(f"| generation, 8 tokens / 16 tokens | {generation_syncs(8)} / {generation_syncs(16)} |")
    cfg = load_preset("350m", WIDE)
    mem = sp_memory(cfg, args.batch, args.seq_len)
    print(f"\nSequence parallelism, 350m width ({cfg.hidden_size}, {cfg.num_layers} layers + top query), TP=2, "
          f"micro-batch {args.batch} x {args.seq_len}, fp32, bytes kept for backward on one rank:\n")
    print("| | measured MiB | planner MiB | planner / measured |\n|---|---|---|---|")
    for sp in (False, True):
        predicted = activation_bytes(cfg, 2, args.batch, args.seq_len, 4, "off", sequence_parallel=sp)
        print(f"| {'with' if sp else 'without'} sequence parallelism | {mem[sp] / 2**20:.2f} | "
              f"{predicted / 2**20:.2f} | {predicted / mem[sp]:.3f} |")
    s, b, h, layers = args.seq_len, args.batch, cfg.hidden_size, cfg.total_layers
    replicated = (4 * layers + 2) * s * b * h * 4
    print(f"\nreplicated parts without it: {replicated / 2**20:.2f} MiB; saved by it: "
          f"{(mem[False] - mem[True]) / 2**20:.2f} MiB ({(mem[False] - mem[True]) / replicated:.1%} of them; "
          f"TP=2 ideal 50%); total ratio {mem[True] / mem[False]:.3f}")


if __name__ == "__main__":
    main()
