"""Training checkpoints: everything needed to continue bit for bit, written atomically.

    ROOT/step-00000100/model/          native model checkpoint (manifest, TP shards, tokenizer): for generation and
                                       evaluation
    ROOT/step-00000100/deepspeed/      DeepSpeed engine: module, optimizer and ZeRO partitions, LR scheduler, loss scaler
    ROOT/step-00000100/rng/            every rank's RNG states (safetensors)
    ROOT/step-00000100/trainer.json    step, sampler state, skipped steps, resolved config, git revision
    ROOT/latest                        the name of the newest complete checkpoint

A checkpoint is written under ``.tmp-step-...`` and renamed when every rank has finished, then ``latest`` is
replaced: a crash or kill during a save leaves the previous checkpoint loadable. Parameters holding NaN or Inf are
never saved. Every file is made 0644 and every folder 0755 before the rename, whatever the umask (DeepSpeed's and
torch's files included): the group can read a checkpoint, e.g. to evaluate it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from common.contracts import StoreManifest
from common.io import DIR_MODE, make_shared
from megatron_code.checkpoint import latest_pointer, point_latest, save_checkpoint
from megatron_code.model import CodeGeeXModel


def _all_finite(model: CodeGeeXModel) -> bool:
    """Whether every rank's parameters are finite: checked on the device, agreed over all ranks, read once."""
    params = list(model.parameters())
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all().float().reshape(1)  # (1,) on the device
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok.tolist()[0] == 1.0


def save_training_checkpoint(root: Path, step: int, engine: Any, model: CodeGeeXModel, state: dict[str, Any],
                             keep: int, data: StoreManifest | None = None, objective: str | None = None) -> Path:
    """Write checkpoint ``step`` (every rank calls this); returns its directory. ``data``: the training store's
    manifest, whose tokenizer and pair layout generation will need."""
    if not _all_finite(model):
        raise RuntimeError(f"refusing to save the checkpoint of step {step}: parameters hold NaN or Inf")
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        root.chmod(DIR_MODE)
    dist.barrier()
    save_checkpoint(tmp / "model", model, step, data.tokenizer if data else None, data.pairs if data else None,
                    objective)
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng" / f"rank-{rank:05d}.safetensors"))
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
    dist.barrier()
    if rank == 0:
        make_shared(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        point_latest(root, name)
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (via ``latest``), or None."""
    path = latest_pointer(root)
    return path if path is not None and (path / "trainer.json").is_file() else None


def load_training_checkpoint(path: Path, engine: Any) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler, scaler) and this rank's RNG; returns trainer.json."""
    load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"{path / 'deepspeed'}: DeepSpeed found no checkpoint to load")
    rng_file = path / "rng" / f"rank-{dist.get_rank():05d}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return dict(json.loads((path / "trainer.json").read_text()))
