"""The parallel context: process groups passed explicitly, never read from globals inside our code.

Ranks are laid out tensor-parallel fastest, as Megatron does: with world = TP x DP, tensor-parallel group g holds
ranks ``[g*TP, (g+1)*TP)`` (on one node, so its all-reduces stay on NVLink) and data-parallel group t holds ranks
``t, t+TP, t+2*TP, ...``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.config import ConfigError


@dataclass
class ParallelContext:
    """Everything a layer or the trainer needs to know about parallelism."""

    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: Any  # torch.distributed.ProcessGroup
    dp_group: Any
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where this rank computes and where its collectives' tensors live


_TIMEOUT: datetime.timedelta | None = None  # the process group's: new groups get it too (torch gives them its default)


def ensure_process_group(timeout: datetime.timedelta | None = None) -> None:
    """Initialise torch.distributed from the launcher's environment (torchrun, deepspeed, srun), or as a single
    gloo rank when run alone. ``timeout`` bounds every collective, also those of the groups made after it
    (:func:`build_parallel_context`: ``new_group`` alone would give them torch's default, 30 minutes on gloo)."""
    global _TIMEOUT
    if dist.is_initialized():
        return
    timeout = _TIMEOUT = timeout or datetime.timedelta(minutes=30)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun without torchrun: map SLURM's variables
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent hosts the store and keeps it across elastic restarts: a restarted round would find the
            # dead round's addresses there (gloo then hangs in connectFullMesh), so each attempt gets its own prefix.
            # `codegeex launch` sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead: rank 0 then hosts a fresh store
            # each round, which also holds across nodes, whose restart counts can differ.
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            base = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"codegeex/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    else:  # alone: NCCL on a GPU too, so collectives and computation share the device as in a multi-rank job
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it even alone


def build_parallel_context(tp_size: int = 1) -> ParallelContext:
    """Create the tensor- and data-parallel groups for the current world (every rank must call this)."""
    ensure_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise ConfigError(f"world size ({world}) must be a multiple of tensor_model_parallel_size ({tp_size}); "
                          f"factors of {world}: {[f for f in range(1, world + 1) if world % f == 0]}")
    dp_size = world // tp_size
    tp_group = dp_group = None
    for g in range(dp_size):  # every rank creates every group, in the same order
        ranks = list(range(g * tp_size, (g + 1) * tp_size))
        group = dist.new_group(ranks, timeout=_TIMEOUT)
        if rank in ranks:
            tp_group = group
    for t in range(tp_size):
        ranks = list(range(t, world, tp_size))
        group = dist.new_group(ranks, timeout=_TIMEOUT)
        if rank in ranks:
            dp_group = group
    return ParallelContext(tp_size, rank % tp_size, dp_size, rank // tp_size, tp_group, dp_group, rank, world,
                           collective_device())


def single_context() -> ParallelContext:
    """TP=1, DP=1 in this process (a one-rank gloo group, which megatron-core's layers need)."""
    ensure_process_group()
    os.environ.setdefault("LOCAL_RANK", "0")
    if dist.get_world_size() != 1:
        raise RuntimeError("single_context() in a multi-rank job; use build_parallel_context()")
    default = dist.distributed_c10d._get_default_group()
    if id(default) not in _SINGLE:  # one group per process group's life (under NCCL each group is a communicator)
        group = dist.new_group([0])
        _SINGLE[id(default)] = (default, ParallelContext(1, 0, 1, 0, group, group, 0, 1, collective_device()))
    return _SINGLE[id(default)][1]


_SINGLE: dict[int, tuple[Any, ParallelContext]] = {}  # the default group held, so its id is never reused


def collective_device(group: Any = None) -> torch.device:
    """Where tensors handed to ``group``'s collectives must live: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def prepare_sequence_parallel(pc: ParallelContext) -> None:
    """What megatron-core's sequence-parallel linears need beyond the process group: the one scratch buffer they
    gather the sequence into (its only global; we pass every group explicitly), and, on a CPU, somewhere to put it."""
    from megatron.core import parallel_state

    if pc.device.type == "cpu":
        allow_cpu_sequence_parallel()
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()


def allow_cpu_sequence_parallel() -> None:
    """Let megatron-core's sequence-parallel mappings run on a machine without CUDA (gloo, CPU tensors).

    They allocate their gather and reduce-scatter outputs with ``device=torch.cuda.current_device()``, which raises
    where torch has no CUDA; here it answers "cpu" instead. Nothing changes where CUDA exists."""
    if torch.cuda.is_available() or getattr(torch.cuda.current_device, "_codegeex_cpu", False):
        return

    def current_device() -> str:
        return "cpu"

    current_device._codegeex_cpu = True  # type: ignore[attr-defined]
    torch.cuda.current_device = current_device  # type: ignore[assignment]


def seed_device_initialisation(pc: ParallelContext) -> None:
    """Seed megatron-core's CUDA RNG tracker, with which tensor-parallel slices are initialised on the GPU (each
    rank draws only its own slice; the seed is the one ``torch.manual_seed`` set, offset by the TP rank)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(torch.initial_seed() % 2**31, tp_rank=pc.tp_rank, ep_rank=0, etp_rank=0)
