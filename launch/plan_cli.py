"""``codegeex plan``: rank parallelism choices for a model on N devices, or ``--validate`` a config for N ranks."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from common.config import ConfigError

if TYPE_CHECKING:
    from common.devices import Device
    from launch.planner import Choice, PlanRequest


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="codegeex-13b", help="model preset (configs/model/NAME.yaml) or YAML path")
    parser.add_argument("--gpus", type=int, default=8, help="number of devices")
    parser.add_argument("--gpu", default=None, help="A100-40, A100-80, H100-80 (h100-80gb), H200, Ascend910 or custom "
                        "(default H100-80; with --validate: memory is checked against it only when given)")
    parser.add_argument("--memory-gib", type=float, default=0.0, help="custom device: memory")
    parser.add_argument("--tflops", type=float, default=0.0, help="custom device: dense bf16 peak")
    parser.add_argument("--intra-gbps", type=float, default=300.0, help="custom device: intra-node GB/s per device")
    parser.add_argument("--inter-gbps", type=float, default=25.0, help="custom device: inter-node GB/s per device")
    parser.add_argument("--per-node", type=int, default=0, help="devices per node (default 8)")
    parser.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--efficiency", type=float, default=0.5, help="assumed fraction of peak for the matmuls")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context, buffers, fragmentation")
    parser.add_argument("--no-sequence-parallel", action="store_true",
                        help="plan without sequence parallelism (on by default when TP > 1)")
    parser.add_argument("--top", type=int, default=15, help="rows of the ranked table")
    for flag in ("tp", "pp", "dp", "zero", "micro-batch"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"show only choices with this {flag}")
    parser.add_argument("--recompute", choices=["off", "selective", "full"], default=None)
    parser.add_argument("--json", action="store_true", help="print the ranked rows (and the reasons of the rest) as JSON")
    parser.add_argument("--validate", metavar="CONFIG", help="every launch-time check of a training config for "
                        "--world-size ranks, and a dry run of its model on fake process groups")
    parser.add_argument("--world-size", type=int, default=0, help="with --validate: ranks of the job")
    parser.add_argument("--force", action="store_true",
                        help="with --validate: accept memory per rank above --gpu's (reported, not refused)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="with --validate: config overrides")
    parser.set_defaults(func=cmd_plan)


def device_from(args: argparse.Namespace) -> Device:
    import dataclasses

    from common.devices import Device, find_device

    if args.gpu == "custom":
        if args.memory_gib <= 0 or args.tflops <= 0:
            raise ConfigError("--gpu custom needs --memory-gib and --tflops")
        dev = Device("custom", args.memory_gib, args.tflops, args.intra_gbps, args.inter_gbps)
    else:
        dev = find_device(args.gpu or "H100-80")
    return dataclasses.replace(dev, per_node=args.per_node) if args.per_node else dev


def cmd_plan(args: argparse.Namespace) -> int:
    if args.validate:
        from launch.validate import validate_job

        if args.world_size < 1:
            raise ConfigError("--validate needs --world-size N")
        device = device_from(args) if args.gpu else None
        sys.stdout.write(validate_job(args.validate, args.world_size, args.overrides, device, args.force) + "\n")
        return 0
    if args.overrides:
        raise ConfigError(f"key=value overrides ({' '.join(args.overrides)}) go with --validate CONFIG only")
    from launch.planner import PlanRequest, plan
    from megatron_code.config import load_preset

    if args.gpus < 1 or args.global_batch < 1 or args.seq_len < 1:
        raise ConfigError("--gpus, --global-batch and --seq-len must be positive")
    req = PlanRequest(load_preset(args.model), args.gpus, device_from(args), args.global_batch, args.seq_len,
                      args.precision, args.efficiency, args.reserve_gib,
                      sequence_parallel=not args.no_sequence_parallel)
    fits, rejected = plan(req)
    wanted = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "zero": args.zero, "micro_batch": args.micro_batch,
              "recompute": args.recompute}
    filtered = any(v is not None for v in wanted.values())
    keep = [c for c in fits + rejected if all(v is None or getattr(c, k) == v for k, v in wanted.items())]
    shown = keep if filtered else fits[:args.top]
    sys.stdout.write((_json(args, req, fits, rejected, shown) if args.json else
                      _text(args, req, fits, rejected, shown, filtered)) + "\n")
    return 0


def _text(args: argparse.Namespace, req: PlanRequest, fits: list[Choice], rejected: list[Choice], shown: list[Choice],
          filtered: bool) -> str:
    from launch.planner import format_table, rejection_summary

    dev = req.device
    runnable = sum(c.runs for c in fits)
    out = [f"{args.model} on {args.gpus} x {dev.name} ({dev.memory_gib:g} GiB, {dev.peak_tflops:g} TFLOP/s, "
           f"{dev.per_node} per node, {dev.intra_node_gbps:g}/{dev.inter_node_gbps:g} GB/s intra/inter-node), global "
           f"batch {args.global_batch} x {args.seq_len} tokens, {args.precision}, efficiency {args.efficiency:.0%}, "
           f"reserve {args.reserve_gib:g} GiB",
           f"{len(fits)} choices fit ({runnable} of them run in the trainer), {len(rejected)} do not"
           + ("; rows with TP > 1 assume sequence parallelism: train them with model.sequence_parallel=true"
              if req.sequence_parallel else ""), ""]
    ranks = {c.key: i for i, c in enumerate(fits, 1)}
    out.append(format_table(shown, len(shown), ranks))
    if not filtered:
        out += ["", "choices that do not work:"]
        out += [f"  {n:>5} x {kind}  (e.g. {example})" for kind, n, example in rejection_summary(rejected)]
    return "\n".join(out)


def _json(args: argparse.Namespace, req: PlanRequest, fits: list[Choice], rejected: list[Choice],
          shown: list[Choice]) -> str:
    import dataclasses
    import json

    from launch.planner import choice_row, rejection_summary

    ranks = {c.key: i for i, c in enumerate(fits, 1)}
    doc = {"model": args.model, "gpus": args.gpus, "device": dataclasses.asdict(req.device),
           "global_batch": args.global_batch, "seq_len": args.seq_len, "precision": args.precision,
           "efficiency": args.efficiency, "reserve_gib": args.reserve_gib, "sequence_parallel": req.sequence_parallel,
           "fit": len(fits), "runnable": sum(c.runs for c in fits), "rejected": len(rejected),
           "rows": [choice_row(c, ranks.get(c.key)) for c in shown],
           "rejected_reasons": [{"reason": kind, "count": n, "example": ex}
                                for kind, n, ex in rejection_summary(rejected)]}
    return json.dumps(doc, indent=1)
