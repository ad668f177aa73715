"""Training checkpoints: everything needed to continue bit for bit (or on another layout), written atomically.

    ROOT/step-00000100/model/          native model checkpoint (manifest with every file's digest, TP shards,
                                       tokenizer): for generation, evaluation and resuming on another layout
    ROOT/step-00000100/deepspeed/      DeepSpeed engine: module, optimizer and ZeRO partitions, LR scheduler, loss scaler
    ROOT/step-00000100/optimizer/      the optimizer state per parameter, in the model's TP layout (megatron_code/elastic.py)
    ROOT/step-00000100/rng/            every rank's RNG states (safetensors)
    ROOT/step-00000100/trainer.json    step, sampler state, layout, optimizer step and schedule, resolved config, revision
    ROOT/step-00000100/files.json      every file above with its size and xxh3-128 digest (common/integrity.py)
    ROOT/latest                        the name of the newest complete checkpoint

A save, in phases (``SAVE_PHASES``; ``faults.kill_in_save`` kills a rank with SIGKILL at one, for drills and
tests): write everything under ``.tmp-step-...``; hash it (each rank a share of the files); rank 0 lists every
digest in ``files.json`` and ``model/manifest.json``; rename the directory into place (a step saved again is first
renamed aside, ``.old-step-...``, and removed only after); point ``latest`` at it; prune. A kill at any phase leaves
``latest`` naming a complete checkpoint, or, in the instant between the two renames of a re-save, a missing one:
:func:`resume_candidates` then falls back to the newest complete checkpoint before it. Parameters holding NaN or Inf
are never saved. Every file is made 0644 and every folder 0755 before the rename, whatever the umask.

On resume every rank verifies a share of the files (:func:`choose_resume`); a mismatch names the file, and an
automatic resume falls back to the newest intact checkpoint, saying so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from common.contracts import CHECKPOINT_FILES, CheckpointFiles, StoreManifest, load_checkpoint_files, write_manifest
from common.integrity import list_files, my_share, read_parts, record, write_part
from common.io import DIR_MODE, FILE_MODE, make_shared
from data_pipeline.sampler import DataSampler, SamplerState
from megatron_code.checkpoint import (
    LATEST,
    point_latest,
    read_pointer,
    save_checkpoint,
    seal_model_dir,
    step_number,
    verify_together,
)
from megatron_code.elastic import OPTIMIZER_DIR, loss_scaler_state, optimizer_steps, save_optimizer_state
from megatron_code.flight import progress
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import ParallelContext
from megatron_code.train_config import SAVE_PHASES

log = logging.getLogger("codegeex.checkpoint")

_RANK0_PHASES = SAVE_PHASES[-3:]  # replace, latest, prune: only rank 0 does these; the others kill the last rank


def _all_finite(model: CodeGeeXModel) -> bool:
    """Whether every rank's parameters are finite: checked on the device, agreed over all ranks, read once."""
    params = list(model.parameters())
    ok = torch.stack([torch.isfinite(p).all() for p in params]).all().float().reshape(1)  # (1,) on the device
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok.tolist()[0] == 1.0


def _phase(name: str, kill: str | None) -> None:
    """The fault drill: SIGKILL this process at phase ``name`` when ``kill`` names it (on the rank that does it)."""
    progress()  # the flight recorder's watchdog: a long save is not a hung collective
    if kill != name:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == (0 if name in _RANK0_PHASES else world - 1):
        log.warning("faults.kill_in_save: killing rank %d at save phase %r", rank, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def step_of(path: Path) -> int:
    return step_number(path.name)


def _write_state(tmp: Path, engine: Any, model: CodeGeeXModel, state: dict[str, Any], data: StoreManifest | None,
                 objective: str | None, elastic: bool, kill: str | None) -> None:
    """Every file of the checkpoint, under ``tmp`` (every rank)."""
    rank = dist.get_rank()
    _phase("model", kill)
    save_checkpoint(tmp / "model", model, state["step"], data.tokenizer if data else None,
                    data.pairs if data else None, objective, seal=False)
    _phase("deepspeed", kill)
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    _phase("optimizer", kill)
    if elastic:
        save_optimizer_state(tmp / OPTIMIZER_DIR, engine, model, progress)
    _phase("rng", kill)
    (tmp / "rng").mkdir(exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng" / f"rank-{rank:05d}.safetensors"))
    _phase("trainer", kill)
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1) + "\n")


def _hash_share(tmp: Path, kill: str | None) -> None:
    """Each rank hashes its share of the files just written (still in its page cache when it wrote them)."""
    dist.barrier()
    _phase("checksums", kill)
    names = list_files(tmp)
    write_part(tmp, dist.get_rank(), {n: record(tmp / n) for n in my_share(names, dist.get_rank(),
                                                                          dist.get_world_size())})
    dist.barrier()


def _seal(tmp: Path, step: int) -> int:
    """Rank 0: every digest into model/manifest.json and files.json (a file no rank hashed is hashed here);
    returns the checkpoint's size in bytes."""
    parts = read_parts(tmp)
    model_records = {n.split("/", 1)[1]: r for n, r in parts.items() if n.startswith("model/")}
    seal_model_dir(tmp / "model", model_records)
    files = {n: parts.get(n) or record(tmp / n) for n in list_files(tmp, skip=[CHECKPOINT_FILES])}
    files["model/manifest.json"] = record(tmp / "model" / "manifest.json")
    write_manifest(tmp, CheckpointFiles(step=step, files=files), FILE_MODE)
    return sum(r.size for r in files.values())


def _move_into_place(root: Path, tmp: Path, final: Path, kill: str | None) -> None:
    """Rename ``tmp`` to ``final``; a checkpoint already there (the same step saved again) is renamed aside first
    and removed after, so a crash leaves either of them complete."""
    old = root / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    _phase("replace", kill)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; later ones (of a run resumed from an earlier step) stay
    until that step is saved again. Each is renamed aside before it is removed: never a partial ``step-*``. What
    killed saves left (``.tmp-``, ``.old-``, ``.del-`` directories) is removed: ``latest`` now names a newer one."""
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*"), *root.glob(".del-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by saves that were killed (one job per run: none is live)
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and step_of(p) <= step)
    for old in done[:-keep]:
        doomed = root / f".del-{old.name}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_training_checkpoint(root: Path, step: int, engine: Any, model: CodeGeeXModel, state: dict[str, Any],
                             keep: int, data: StoreManifest | None = None, objective: str | None = None,
                             elastic: bool = True, kill: str | None = None) -> Path:
    """Write checkpoint ``step`` (every rank calls this); returns its directory. ``data``: the training store's
    manifest, whose tokenizer and pair layout generation will need; ``elastic``: also the layout-free optimizer
    state; ``kill``: a save phase to SIGKILL a rank at (``faults.kill_in_save``)."""
    if not _all_finite(model):
        raise RuntimeError(f"refusing to save the checkpoint of step {step}: parameters hold NaN or Inf")
    name = f"step-{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    rank, pc = dist.get_rank(), model.pc
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        root.chmod(DIR_MODE)
    dist.barrier()
    state = {"step": step, **state, "layout": layout(pc, engine), "optimizer": optimizer_record(engine)}
    t0 = time.perf_counter()
    _write_state(tmp, engine, model, state, data, objective, elastic, kill)
    t1 = time.perf_counter()
    _hash_share(tmp, kill)
    t2 = time.perf_counter()
    if rank == 0:
        size = _seal(tmp, step)
        log.info("checkpoint %s: %.3f GB written in %.2f s, digests %.2f s (%.1f%% of the save)", name, size / 1e9,
                 t1 - t0, t2 - t1, 100 * (t2 - t1) / max(t2 - t0, 1e-9))
        make_shared(tmp)
        _move_into_place(root, tmp, final, kill)
        _phase("latest", kill)
        point_latest(root, name)
        _phase("prune", kill)
        prune(root, step, keep)
    dist.barrier()
    return final


def precision_of(engine: Any) -> str:
    bf16 = getattr(engine, "bfloat16_enabled", lambda: False)()
    return "bf16" if bf16 else "fp16" if getattr(engine, "fp16_enabled", lambda: False)() else "fp32"


def layout(pc: ParallelContext, engine: Any) -> dict[str, Any]:
    """What DeepSpeed's own files depend on: TP and DP sizes, the ZeRO stage in effect, the precision (which
    optimizer wraps Adam)."""
    return {"tp": pc.tp_size, "dp": pc.dp_size, "zero_stage": int(engine.zero_optimization_stage()),
            "dtype": precision_of(engine)}


def optimizer_record(engine: Any) -> dict[str, Any]:
    """What a resume on another layout needs beside the tensors: Adam's step count, the schedule, DeepSpeed's
    counters."""
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else {}
    return {"steps": optimizer_steps(engine), "scheduler": scheduler, "loss_scaler": loss_scaler_state(engine),
            "counters": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                         "skipped_steps": int(engine.skipped_steps)}}


def _complete(path: Path) -> bool:
    """A step directory appears only by a rename after its save finished: it is complete when it has trainer.json."""
    return path.is_dir() and (path / "trainer.json").is_file()


def resume_candidates(root: Path) -> list[Path]:
    """The checkpoints an automatic resume may take, best first: the one ``latest`` names, then every complete one
    of an earlier step, newest first. When ``latest`` names a missing directory (a re-save killed between its two
    renames) the copy renamed aside, then those before its step; without a pointer (a crash between a first save's
    rename and its pointer), every complete one."""
    steps = sorted((p for p in root.glob("step-*") if _complete(p)), key=step_of, reverse=True)
    name = read_pointer(root)
    if name is None:
        return steps
    named, limit = root / name, step_number(name)
    aside = root / f".old-{named.name}"  # a re-save killed between its renames: the one the pointer named
    head = [named] if _complete(named) else [aside] if _complete(aside) else []
    if head != [named]:
        log.warning("%s: its %s pointer names %s, which is not a complete checkpoint: taking %s", root, LATEST,
                    named.name, head[0].name if head else "the newest complete one before it")
    return head + [p for p in steps if step_of(p) < limit]


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (:func:`resume_candidates`; not verified), or None."""
    candidates = resume_candidates(root) if root.is_dir() else []
    return candidates[0] if candidates else None


_legacy_warned: set[Path] = set()


def verify_checkpoint(path: Path) -> list[str]:
    """The problems of a training checkpoint's files against its files.json, found by all ranks together (each
    hashes a share; every rank gets the whole list). Every rank calls this."""
    from common.config import ConfigError
    from common.contracts import ManifestError

    try:
        files = load_checkpoint_files(path).files
    except FileNotFoundError:
        if path not in _legacy_warned and _complete(path):
            _legacy_warned.add(path)
            log.warning("%s: no %s (written before checkpoints listed their files): not verified", path,
                        CHECKPOINT_FILES)
        return [] if _complete(path) else [f"{path}: not a complete training checkpoint (no trainer.json)"]
    except (ManifestError, ConfigError) as exc:
        return [str(exc)]
    return verify_together(path, files)


def choose_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from (every rank calls this): ``none``: None; a path: that one, verified (a
    CorruptCheckpointError names the bad files); ``auto``: the newest intact one of :func:`resume_candidates`,
    falling back past corrupt ones with a warning naming their bad files (every one corrupt: an error)."""
    from common.integrity import CorruptCheckpointError

    if resume == "none":
        return None
    candidates = resume_candidates(root) if resume == "auto" else [Path(resume)]
    if resume != "auto" and not _complete(candidates[0]):
        raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete training checkpoint (a step-N "
                                "directory with trainer.json)")
    for i, path in enumerate(candidates):
        problems = verify_checkpoint(path)
        if not problems:
            if i:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        if resume != "auto":
            raise CorruptCheckpointError(f"checkpoint.resume {path} is corrupt: {shown}")
        later = "falling back to the one before it" if i + 1 < len(candidates) else "no earlier one is left"
        log.warning("checkpoint %s is corrupt: %s; %s", path, shown, later)
    if candidates:
        raise CorruptCheckpointError(f"{root}: every checkpoint is corrupt ({', '.join(p.name for p in candidates)}); "
                                     "resume one explicitly with checkpoint.resume=PATH after repairing it, or start "
                                     "afresh with checkpoint.resume=none")
    return None


def trainer_state(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "trainer.json").read_text()))


def needs_elastic(path: Path, pc: ParallelContext, zero_stage: int, dtype: str) -> bool:
    """Whether resuming ``path`` here changes what DeepSpeed's own files depend on (TP, DP, ZeRO stage, precision);
    then its layout-free optimizer state must be there (a FileNotFoundError saying how to resume otherwise)."""
    saved = trainer_state(path).get("layout")
    here = {"tp": pc.tp_size, "dp": pc.dp_size, "zero_stage": zero_stage, "dtype": dtype}
    if saved is None or saved == here:
        return False
    log.info("resuming %s saved as TP %d x DP %d (ZeRO %d, %s) on TP %d x DP %d (ZeRO %d, %s): resharding the model "
             "and the optimizer state", path, saved["tp"], saved["dp"], saved["zero_stage"], saved.get("dtype"),
             pc.tp_size, pc.dp_size, zero_stage, dtype)
    if not any((path / OPTIMIZER_DIR).glob("optim-tp*.safetensors")):
        raise FileNotFoundError(f"{path}: saved as TP {saved['tp']} x DP {saved['dp']} (ZeRO {saved['zero_stage']}, "
                                f"{saved.get('dtype')}) without its layout-free optimizer state ({OPTIMIZER_DIR}/: "
                                "checkpoint.elastic was false, or the precision did not allow it): resume it with "
                                "those TP and DP sizes, ZeRO stage and precision")
    return True


def _restore_rng(path: Path, same_world: bool = True) -> None:
    """This rank's saved RNG states; on another world size none (a rank's old states would pair it with ranks of
    another TP group): the seeded ones are kept, the same for every rank of a TP group."""
    rng_file = path / "rng" / f"rank-{dist.get_rank():05d}.safetensors"
    if not same_world or not rng_file.is_file():
        log.info("%s: no RNG state saved for rank %d (another world size): keeping the seeded one", path,
                 dist.get_rank())
        return
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_training_checkpoint(path: Path, engine: Any) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler, scaler) and this rank's RNG; returns trainer.json."""
    load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"{path / 'deepspeed'}: DeepSpeed found no checkpoint to load")
    _restore_rng(path)
    return trainer_state(path)


def load_elastic_checkpoint(path: Path, engine: Any, model: CodeGeeXModel) -> dict[str, Any]:
    """Restore the optimizer state, schedule and counters saved under another layout (the model's weights were
    loaded, resharded, before the engine was built); returns trainer.json."""
    from megatron_code.checkpoint import read_manifest
    from megatron_code.elastic import load_optimizer_state, restore_schedule

    state = trainer_state(path)
    opt = state["optimizer"]
    load_optimizer_state(path / OPTIMIZER_DIR, engine, model, read_manifest(path / "model").tensors, opt["steps"])
    restore_schedule(engine, opt["scheduler"], opt["counters"], opt.get("loss_scaler"))
    _restore_rng(path, same_world=state["layout"]["tp"] * state["layout"]["dp"] == dist.get_world_size())
    return state


@dataclass
class ResumePlan:
    """Where a run continues from, chosen and verified while it is built (:func:`build`)."""

    path: Path | None = None  # the checkpoint; None: start afresh
    elastic: bool = False  # saved under another TP x DP layout or ZeRO stage: model resharded, optimizer rebuilt


def resume_point(plan: ResumePlan, engine: Any, model: CodeGeeXModel, sampler: DataSampler) -> tuple[int, int]:
    """Restore the checkpoint the run continues from (chosen by :func:`build`) into the engine and sampler; returns
    (its step, the steps skipped so far), (0, 0) when the run starts fresh. The sampler's state counts samples of the
    global batch, so it continues exactly on any data-parallel size."""
    resume = plan.path
    if resume is None:
        return 0, 0
    state = load_elastic_checkpoint(resume, engine, model) if plan.elastic else load_training_checkpoint(resume, engine)
    sampler.state = SamplerState.from_dict(state["sampler"])
    log.info("resumed from %s at step %d", resume, state["step"])
    return state["step"], state["skipped_steps"]
