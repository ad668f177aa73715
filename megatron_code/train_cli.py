"""``codegeex train --config CFG [key=value ...]``: run under torchrun, the deepspeed launcher or srun."""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training YAML (configs/train/*.yaml); key=value overrides win")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from megatron_code.train_config import load_train_config
    from megatron_code.training import train

    cfg = load_train_config(args.config, args.overrides)  # every value checked before any process group
    train(cfg, ["codegeex", *sys.argv[1:]])
    return 0
