"""The ``codegeex`` command: one entry point, a subcommand group per job.

Each group lives in the package that owns the job and registers its own subcommands through a
``register(parser)`` function; heavy imports (torch, megatron-core) happen inside the handlers, so
``codegeex --help`` and the data commands start in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError
from common.logs import setup_logging
from launch.launchers import GPU_ENVIRONMENT, extensions_dir

# group name -> (module with register(parser), one-line help). Later jobs add their group here.
GROUPS: dict[str, tuple[str, str]] = {
    "data": ("data_pipeline.cli", "source trees -> tokenizer and sharded Arrow token store; inspect stores"),
    "model": ("megatron_code.cli", "model presets (parameters, FLOPs, memory), checkpoint conversion, generation"),
    "train": ("megatron_code.train_cli", "train with DeepSpeed ZeRO x tensor parallelism (under torchrun/deepspeed/srun)"),
    "plan": ("launch.plan_cli", "rank TP x PP x DP x ZeRO x micro-batch x checkpointing choices; --validate a config"),
    "eval": ("eval_harness.cli", "HumanEval-X / MBPP: generate from checkpoints, execute in a sandbox, score, report"),
    "launch": ("launch.launch_cli", "start a training job: this machine, several (torchrun, deepspeed) or SLURM"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codegeex", description="Pre-train, launch and evaluate CodeGeeX-shaped models.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for name, (module, help_text) in GROUPS.items():
        sub = groups.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).register(sub)
    return parser


def expand_argument_file(argv: Sequence[str]) -> list[str]:
    """``codegeex @FILE``: the arguments are FILE's JSON list of strings (how launchers hand a command to every rank:
    torchrun's own parser would claim options such as ``--n`` that it reads as abbreviations of its own)."""
    argv = list(argv)
    if len(argv) != 1 or not argv[0].startswith("@"):
        return argv
    path = argv[0][1:]
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"codegeex: argument file {path}: {exc}") from None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SystemExit(f"codegeex: argument file {path} must hold a JSON list of strings")
    return values


def parse_anywhere(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with flags anywhere on the line: ``key=value`` overrides after a flag (which argparse leaves over once
    the positional list has ended) join the command's overrides; anything else left over is an error."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and isinstance(args.overrides, list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def pop_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--log-level X`` (or ``--log-level=X``) taken from anywhere before a ``--`` (after it, the words are a
    nested job's own command line): the top-level flag then works after the group and subcommand too."""
    level, out = None, []
    i, end = 0, argv.index("--") if "--" in argv else len(argv)
    while i < len(argv):
        word = argv[i]
        if i < end and word == "--log-level" and i + 1 < end:
            level, i = argv[i + 1], i + 2
            continue
        if i < end and word.startswith("--log-level="):
            level = word.split("=", 1)[1]
        else:
            out.append(word)
        i += 1
    return level, out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    level, words = pop_log_level(expand_argument_file(sys.argv[1:] if argv is None else argv))
    args = parse_anywhere(parser, words)
    args.log_level = level or args.log_level
    setup_logging(args.log_level)
    if args.group == "train":
        # a rank started by hand (`torchrun -m launch.cli train ...`, not `codegeex launch`) gets what the launchers
        # give it: a JIT build, if DeepSpeed ever needs one, goes to this environment, not to a ~/.cache shared with
        # other environments and their stale locks. Set before the handler imports deepspeed.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
        import torch  # asks the driver for devices without creating a CUDA context, so the variables still apply

        if torch.cuda.is_available():  # the workers' own view: right also when launched from a CPU head node
            for key, value in GPU_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        logging.getLogger("codegeex").error("configuration error: %s", exc)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("codegeex").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
