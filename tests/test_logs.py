"""Logging on several ranks: our lines carry the rank, a library's warnings (DeepSpeed, megatron-core, torch,
``warnings.warn``) are shown once, from rank 0, whatever handler the library installs, and errors show from every
rank."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import run_ranks


def _log_on_every_rank(out: str) -> None:
    """One rank: its stdout and stderr into OUT/rank-R.log, then the messages that each kind of logger emits."""
    rank = int(os.environ["RANK"])
    fd = os.open(Path(out) / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import logging
    import warnings

    import torch.distributed as dist

    from common.logs import adopt_library_loggers, setup_logging

    setup_logging("INFO")
    dist.init_process_group("gloo")
    ours = logging.getLogger("codegeex.test")
    ours.info("our info on rank %d", rank)
    ours.warning("our warning on rank %d", rank)
    warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
    import deepspeed  # installs its handler on stdout and warns while importing (no accelerator here)
    from deepspeed.utils import logger as ds_logger

    adopt_library_loggers()  # what the trainer calls after importing deepspeed
    ds_logger.setLevel(logging.INFO)
    ds_logger.info("deepspeed info line")
    ds_logger.warning("deepspeed warning line")
    deepspeed.utils.logging.log_dist("deepspeed log_dist line", ranks=[-1])
    logging.getLogger("megatron.core.parallel_state").warning("megatron warning line")
    logging.getLogger("torch.distributed.distributed_c10d").warning("torch warning line")
    if rank == 1:
        ds_logger.error("deepspeed error on rank 1")
        logging.getLogger("megatron.core").error("megatron error on rank 1")
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()


@pytest.mark.distributed
def test_rank_prefixes_library_warnings_once_and_errors_from_every_rank(tmp_path):
    run_ranks(_log_on_every_rank, 2, str(tmp_path))
    logs = {r: (tmp_path / f"rank-{r}.log").read_text() for r in (0, 1)}
    both = logs[0] + logs[1]
    lines = [line for line in both.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    for r, text in logs.items():  # every line of ours (and of the libraries, now ours) carries its rank
        for line in text.splitlines():
            if re.match(r"\d\d:\d\d:\d\d ", line):
                assert f" [rank {r}] " in line, (r, line)
    assert "our info on rank 0" in logs[0] and "our info on rank 1" not in both  # INFO: rank 0 only
    assert "[rank 0] WARNING codegeex.test: our warning on rank 0" in logs[0]
    assert "[rank 1] WARNING codegeex.test: our warning on rank 1" in logs[1]  # our warnings: every rank
    for once in ("FutureWarning: a library's FutureWarning", "deepspeed info line", "deepspeed warning line",
                 "deepspeed log_dist line", "megatron warning line", "torch warning line"):
        found = [line for line in lines if once in line]
        assert len(found) == 1 and "[rank 0]" in found[0], (once, found, both)
    # what DeepSpeed logs while it is imported, before the trainer can adopt its logger (on CPUs: no accelerator)
    accelerator = [line for line in lines if "Setting accelerator to CPU" in line]
    assert len(accelerator) == (0 if torch.cuda.is_available() else 1), both
    assert all("[rank 0] WARNING DeepSpeed: " in line for line in accelerator)  # our format, not DeepSpeed's
    assert "[rank 0] WARNING py.warnings: " in logs[0] and "[WARNING]" not in both
    assert "[rank 1] ERROR DeepSpeed: deepspeed error on rank 1" in logs[1]
    assert "[rank 1] ERROR megatron.core: megatron error on rank 1" in logs[1]
