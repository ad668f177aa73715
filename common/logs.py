"""Logging set-up shared by every job: one format, and only rank 0 speaks below WARNING."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any


class RankFilter(logging.Filter):
    """Let INFO and DEBUG through on rank 0 only; warnings and errors from every rank, tagged with it."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def current_rank() -> int:
    """The global rank from the launcher's environment (torchrun, deepspeed, srun), 0 when run alone."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup_logging(level: str | int = "INFO", rank: int | None = None) -> None:
    """Configure the root logger once for a process (idempotent)."""
    rank = current_rank() if rank is None else rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_codegeex", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._codegeex = True  # type: ignore[attr-defined]
    handler.addFilter(RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("megatron", "torch.distributed", "deepspeed"):  # their INFO chatter is not ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A progress bar on interactive terminals (or with CODEGEEX_PROGRESS=1), silent otherwise (logs, CI)."""
    from tqdm import tqdm

    off = bool(kwargs.pop("disable", False))
    enabled = (sys.stderr.isatty() or os.environ.get("CODEGEEX_PROGRESS") == "1") and not off
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)
