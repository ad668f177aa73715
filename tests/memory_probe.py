"""Measure the peak tensor memory of two real training steps on CPU and print it beside the planner's prediction.

``python -m tests.memory_probe PRESET SEQ_LEN``: builds the trainer (DeepSpeed engine, fp32, DP=1, TP=1) on a
synthetic store, records every CPU allocation and free with torch's profiler from before the model exists to the
end of the second step (the first whose forward runs beside Adam's states), and prints JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(prof: profile) -> int:
    """Largest sum of live CPU allocations over the profile, from its allocation events in time order."""
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def main(preset: str, seq: int) -> dict[str, float]:
    import yaml

    from launch.planner import PlanRequest, memory_gib
    from megatron_code.objectives import prepare_batch
    from megatron_code.train_config import load_train_config
    from megatron_code.training import _micro_batches, build, train_step
    from tests.model_utils import synthetic_store
    from tests.train_utils import values

    tmp = Path(tempfile.mkdtemp())
    v = values(synthetic_store(tmp / "store", windows=8, seq_len=seq, vocab=8000), str(tmp / "run"),
               micro_batch_size=1, data__global_batch_size=1)
    del v["model"]
    v["model_preset"] = preset
    (tmp / "c.yaml").write_text(yaml.safe_dump(v))
    cfg = load_train_config(tmp / "c.yaml", [])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pc, _, engine, sampler = build(cfg)
        for _ in range(2):
            train_step(engine, pc, [prepare_batch(m) for m in _micro_batches(sampler.next_batch(), 1)])
    req = PlanRequest(cfg.model, 1, None, 1, seq, "float32", reserve_gib=0.0)  # type: ignore[arg-type]
    predicted = memory_gib(req, tp=1, pp=1, dp=1, zero=0, mb=1, recompute="off")
    return {"measured_gib": peak_bytes(prof) / 2**30, "predicted_gib": predicted["total"], "parts": predicted}


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.stdout.write(json.dumps(main(sys.argv[1], int(sys.argv[2]))) + "\n")
