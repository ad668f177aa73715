"""Logging set-up shared by every job: one format with the rank on every line, and what each rank shows.

- Our own loggers (``codegeex.*`` and this project's modules): INFO and DEBUG from rank 0 only, warnings and errors
  from every rank.
- Third-party output (DeepSpeed's ``DeepSpeed`` logger, megatron-core's ``megatron.core.*``, torch's loggers, and
  Python warnings, ``warnings.warn``, captured as the ``py.warnings`` logger): the same on every rank, so shown once,
  from rank 0; errors from every rank. DeepSpeed and torch install their own stream handlers (DeepSpeed at import,
  on stdout, without the rank); :func:`adopt_library_loggers` removes them so their records reach our handler.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"
OURS = ("codegeex", "common", "data_pipeline", "megatron_code", "eval_harness", "launch", "benchmarks", "tests",
        "gpu_acceptance", "__main__")
LIBRARIES = ("DeepSpeed", "deepspeed", "torch", "megatron")  # loggers whose own stream handlers give way to ours


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class RankFilter(logging.Filter):
    """Tag every record with the rank. Rank 0 shows everything; other ranks show our warnings and errors, and only
    the errors of everything else (a library's warnings are the same on every rank)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        if record.name == "py.warnings" and isinstance(record.msg, str):  # formatwarning's text ends in a newline
            record.msg = record.msg.rstrip()
        if self.rank == 0:
            return True
        return record.levelno >= (logging.WARNING if _under(record.name, OURS) else logging.ERROR)


def current_rank() -> int:
    """The global rank from the launcher's environment (torchrun, deepspeed, srun), 0 when run alone."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _foreign(handler: logging.Handler) -> bool:
    """A library's own console handler (files and null handlers are left alone)."""
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and not getattr(handler, "_codegeex", False))


def _adopt(logger: logging.Logger) -> None:
    own = [h for h in logger.handlers if _foreign(h)]
    for handler in own:
        logger.removeHandler(handler)
    if own:
        logger.propagate = True  # on to the root logger's handler: ours


class _AdoptOnUse(logging.Filter):
    """On a library's logger that may install its handler later: adopt it before each record is handled, so even
    what it logs while being imported (DeepSpeed's accelerator warning) goes through our handler."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        if any(_foreign(h) for h in self.logger.handlers):
            _adopt(self.logger)  # Logger.handle reads the handlers after its filters: this record already goes to ours
        return True


def adopt_library_loggers() -> None:
    """Route the loggers of DeepSpeed, torch and megatron-core through our handler (their own console handlers
    removed): call after importing them. ``setup_logging`` does it for those already imported."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and _under(name, LIBRARIES):
            _adopt(logger)


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
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("megatron", "torch.distributed", "deepspeed"):  # their INFO chatter is not ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    deepspeed = logging.getLogger("DeepSpeed")  # created (with its handler) when deepspeed is imported
    for old in [f for f in deepspeed.filters if isinstance(f, _AdoptOnUse)]:
        deepspeed.removeFilter(old)
    deepspeed.addFilter(_AdoptOnUse(deepspeed))
    adopt_library_loggers()
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger: prefixed, shown from rank 0
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A progress bar on interactive terminals (or with CODEGEEX_PROGRESS=1), silent otherwise (logs, CI)."""
    from tqdm import tqdm

    off = bool(kwargs.pop("disable", False))
    enabled = (sys.stderr.isatty() or os.environ.get("CODEGEEX_PROGRESS") == "1") and not off
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)
