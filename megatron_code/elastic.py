"""Optimizer state that does not depend on the layout, so that a run resumes on another TP or DP size.

DeepSpeed's own checkpoint (``step-N/deepspeed/``) holds each data-parallel rank's ZeRO partition of flattened
buffers: it loads only into the same TP x DP layout and ZeRO stage. Beside it every checkpoint holds the optimizer
state per parameter, in the model's own tensor-parallel layout::

    step-N/optimizer/optim-tp00-of-02-part000-of-002.safetensors   NAME/fp32, NAME/exp_avg, NAME/exp_avg_sq

one file per (TP rank, DP rank): parameter ``i`` of a TP rank is written by DP rank ``i % DP``, so every rank writes
about the same amount and the files together hold one copy of the state. The values are gathered with DeepSpeed's
``safe_get_full_*`` functions (ZeRO 1, 2 and 3; a collective over the DP group) or, without ZeRO, read from torch's
AdamW state. Resuming into another layout (:func:`load_optimizer_state`) reads each parameter's slice for the new TP
rank (resharded like the model's weights, :func:`megatron_code.checkpoint.tp_slice`), creates the optimizer's state
buffers, and writes the values with ``safe_set_full_*`` (or into AdamW's state); the step count, learning rate and
schedule come from ``trainer.json``. The model's weights come from ``step-N/model/`` before the engine is built.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from common.contracts import TensorSpec
from common.io import DIR_MODE, FILE_MODE
from megatron_code.checkpoint import tp_slice
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import ParallelContext

log = logging.getLogger("codegeex.checkpoint")

OPTIMIZER_DIR = "optimizer"
KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_FILE = re.compile(r"optim-tp(\d+)-of-(\d+)-part(\d+)-of-(\d+)\.safetensors")


def optim_file(tp_rank: int, tp: int, part: int, parts: int) -> str:
    return f"optim-tp{tp_rank:02d}-of-{tp:02d}-part{part:03d}-of-{parts:03d}.safetensors"


def _deepspeed_managed(param: Tensor) -> bool:
    """Whether a ZeRO (or DeepSpeed bf16) optimizer holds this parameter's fp32 master and state."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """torch's AdamW under the engine: ZeRO's optimizers wrap it as ``.optimizer``; without ZeRO it is the engine's."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def optimizer_steps(engine: Any) -> int:
    """The optimizer's step count (Adam's bias correction): steps applied, skipped ones not counted."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def supported(engine: Any, model: CodeGeeXModel) -> str | None:
    """Why this engine's optimizer state cannot be saved per parameter, or None. DeepSpeed's fp16/bf16 optimizer
    without ZeRO keys Adam's state by fp32 copies of its own, which neither ``safe_get_full_*`` nor AdamW's state
    reaches."""
    params = list(model.parameters())
    if all(_deepspeed_managed(p) for p in params) or engine.optimizer is base_optimizer(engine):
        return None
    return (f"{type(engine.optimizer).__name__} (bf16/fp16 without ZeRO) keeps its fp32 master weights apart; use "
            "zero_stage >= 1 to resume on another layout")


def full_state(engine: Any, param: Tensor, stepped: bool) -> dict[str, Tensor]:
    """fp32 master weight and Adam moments of ``param`` (this TP rank's piece, whole over DP). A collective over
    the data-parallel group under ZeRO: every DP rank calls it for the same parameters in the same order.
    ``stepped``: whether Adam's state exists (the same answer on every rank, so the collectives match)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _deepspeed_managed(param):
        out = {"fp32": safe_get_full_fp32_param(param)}
        for key in KEYS[1:]:
            out[key] = safe_get_full_optimizer_state(param, key) if stepped else torch.zeros_like(out["fp32"])
        return out
    state = base_optimizer(engine).state.get(param, {})
    fp32 = param.detach().float()
    return {"fp32": fp32, **{k: state[k].float() if k in state else torch.zeros_like(fp32) for k in KEYS[1:]}}


def _link_states(engine: Any) -> None:
    """Point ZeRO 1/2's per-parameter fragments at Adam's buffers. DeepSpeed links them after its first step but
    not again after loading its own checkpoint (the fragments are rebuilt empty while it believes them linked)."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state") and base_optimizer(engine).state:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def save_optimizer_state(directory: Path, engine: Any, model: CodeGeeXModel, progress: Any = None) -> bool:
    """Write this rank's share of the layout-free optimizer state (every rank calls this); False, with a warning,
    when this optimizer's state cannot be (:func:`supported`). ``progress``: called after each parameter."""
    pc = model.pc
    why = supported(engine, model)
    if why is not None:
        if pc.rank == 0:
            log.warning("checkpoint without the layout-free optimizer state: %s", why)
        return False
    _link_states(engine)
    stepped = optimizer_steps(engine) > 0
    mine: dict[str, Tensor] = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        values = full_state(engine, p, stepped)  # collective under ZeRO: every DP rank, every parameter
        if progress is not None:
            progress()
        if i % pc.dp_size == pc.dp_rank:
            mine.update({f"{name}/{k}": v.detach().float().cpu().contiguous() for k, v in values.items()})
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(DIR_MODE)
    path = directory / optim_file(pc.tp_rank, pc.tp_size, pc.dp_rank, pc.dp_size)
    save_file(mine, str(path))
    path.chmod(FILE_MODE)
    return True


class _Reader:
    """The saved tensors of every old TP rank, found by name across the part files."""

    def __init__(self, directory: Path) -> None:
        self.where: dict[tuple[int, str], Any] = {}
        self.tp = 0
        for f in sorted(directory.glob("optim-tp*.safetensors")):
            m = _FILE.fullmatch(f.name)
            if m is None:
                continue
            tp_rank, self.tp = int(m[1]), int(m[2])
            handle = safe_open(str(f), framework="pt")
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self.where[(tp_rank, key)] = handle
        if not self.where:
            raise FileNotFoundError(f"{directory}: no optimizer state files (optim-tp*.safetensors): the checkpoint "
                                    "was written with checkpoint.elastic=false; resume it with its own TP and DP sizes")

    def piece(self, name: str, key: str, spec: TensorSpec, pc: ParallelContext) -> Tensor:
        full = f"{name}/{key}"

        def read(k: int, index: tuple[slice, ...]) -> Tensor:
            handle = self.where.get((k, full))
            if handle is None:
                raise KeyError(f"optimizer state {full} of TP rank {k} is missing from the checkpoint")
            return handle.get_slice(full)[index] if index else handle.get_tensor(full)

        return tp_slice(spec, self.tp, pc.tp_size, pc.tp_rank, read)


def _create_states(engine: Any, steps: int) -> None:
    """Adam's buffers for every tensor torch's AdamW steps (ZeRO's flat partitions, or the parameters), zeroed,
    with the step count; ZeRO 1/2 then link each parameter's fragment to them."""
    opt = base_optimizer(engine)
    for group in opt.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for t in group["params"]:
            step = torch.tensor(float(steps), dtype=torch.float32, device=t.device if on_device else "cpu")
            opt.state[t] = {"step": step, "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
    _link_states(engine)


def load_optimizer_state(directory: Path, engine: Any, model: CodeGeeXModel, specs: dict[str, TensorSpec],
                         steps: int) -> None:
    """Fill the engine's optimizer from a checkpoint of any TP x DP layout and ZeRO stage (every rank calls this).
    The model's weights must already be loaded (before the engine was built)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    reader = _Reader(directory)
    _create_states(engine, steps)
    opt = base_optimizer(engine)
    for name, p in model.named_parameters():
        values = {k: reader.piece(name, k, specs[name], model.pc) for k in KEYS}
        if tuple(values["fp32"].shape) != tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape):
            raise ValueError(f"{directory}: optimizer state of {name} has shape {tuple(values['fp32'].shape)}, the "
                             f"model wants {tuple(p.shape)}")
        if _deepspeed_managed(p):
            safe_set_full_fp32_param(p, values["fp32"].to(p.device))
            for key in KEYS[1:]:
                safe_set_full_optimizer_state(p, values[key].to(p.device), key)
        else:
            with torch.no_grad():
                p.copy_(values["fp32"])
            for key in KEYS[1:]:
                opt.state[p][key].copy_(values[key])


_SCALER = ("cur_scale", "cur_hysteresis", "last_overflow_iter", "cur_iter")  # fp16's dynamic loss scaler


def loss_scaler_state(engine: Any) -> dict[str, float]:
    """fp16's dynamic loss scale and its counters (empty without one)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {k: float(getattr(scaler, k)) for k in _SCALER if hasattr(scaler, k)} if scaler is not None else {}


def restore_schedule(engine: Any, scheduler_state: dict[str, Any], counters: dict[str, int],
                     scaler: dict[str, float] | None = None) -> None:
    """The LR schedule (and the learning rate the next step uses), DeepSpeed's step counters and fp16's loss
    scaler (so the first steps after the resume do not overflow and skip)."""
    target = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in (scaler or {}).items():
        if target is not None and hasattr(target, key):
            setattr(target, key, type(getattr(target, key))(value))
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(scheduler_state)
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
