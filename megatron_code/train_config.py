"""``codegeex train`` configuration: one dataclass per concern, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from common.config import ConfigError, load_config, option
from data_pipeline.sampler import SamplerConfig
from megatron_code.config import PRESET_DIR, ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay (CodeGeeX's defaults)."""

    lr: float = option(1e-4, "peak learning rate")
    min_lr: float = option(1e-6, "floor of the cosine decay")
    warmup_steps: int = option(100, "linear warmup from 0 to lr")
    decay_steps: int = option(0, "steps of cosine decay after warmup (0: until train_steps)")
    beta1: float = option(0.9, "Adam beta1")
    beta2: float = option(0.95, "Adam beta2")
    eps: float = option(1e-8, "Adam epsilon")
    weight_decay: float = option(0.1, "decoupled weight decay, not applied to biases and LayerNorms")
    clip_grad: float = option(1.0, "global gradient-norm clipping (0: off)")
    fused: bool = option(True, "torch's fused AdamW kernels (CUDA and CPU, shipped with torch: nothing is compiled at "
                         "run time); false: its multi-tensor (foreach) AdamW")


@dataclass
class PrecisionConfig:
    """Training precision and fp16 dynamic loss scaling."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto: model.params_dtype's when set, else bf16 on GPUs and fp32 on CPU; bf16/fp16 keep fp32 master "
        "weights and Adam state in every ZeRO stage, and the loss in fp32")
    initial_scale_power: int = option(16, "fp16: the first loss scale is 2**this")
    loss_scale_window: int = option(1000, "fp16: steps without overflow before the scale doubles")
    hysteresis: int = option(2, "fp16: overflows tolerated before the scale halves")
    min_loss_scale: float = option(1.0, "fp16: the scale never goes below this")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO's communication settings (the stage is ``zero_stage``)."""

    overlap_comm: bool = option(True, "ZeRO 2/3 on GPUs: reduce gradient buckets while backward still runs")
    contiguous_gradients: bool = option(True, "ZeRO 2/3: copy gradients into one contiguous buffer as they are "
                                        "produced (less fragmentation)")
    reduce_bucket_size: int = option(500_000_000, "elements reduced at once (larger: fewer, bigger collectives)")
    allgather_bucket_size: int = option(500_000_000, "elements all-gathered at once after the step (ZeRO 1/2)")


@dataclass
class CheckpointConfig:
    """Checkpoints: atomic, a `latest` pointer, the last `keep` kept."""

    dir: str = option("", "checkpoint root (default: RUN_DIR/checkpoints)")
    interval: int = option(100, "save every this many steps (and at the end)")
    keep: int = option(3, "keep the newest this many checkpoints")
    resume: str = option("auto", "auto: continue from the newest intact checkpoint if any (a corrupt one is skipped, "
                         "saying so); none: start fresh; or a path (verified: a corrupt file is an error)")
    elastic: bool = option(True, "also save the optimizer state per parameter in the model's TP layout (about the "
                           "size of DeepSpeed's optimizer files), so that the run can resume on another TP or DP size")


@dataclass
class WandbConfig:
    """Weights & Biases logging from rank 0 (megatron_code/observe.py): every metrics.jsonl line, the resolved config
    once; a resumed run continues the same W&B run (its id is kept in RUN_DIR/wandb-run-id)."""

    mode: Literal["disabled", "offline", "online"] = option(
        "disabled", "disabled: no W&B; offline: write the run under DIR/wandb/ with no network (`wandb sync` it "
        "later); online: stream it to the W&B server (needs `wandb login` or WANDB_API_KEY)")
    project: str = option("codegeex", "W&B project")
    entity: str = option("", "W&B entity (team or user; empty: the account's default)")
    name: str = option("", "W&B run name (empty: the run directory's name)")
    tags: list[str] = option([], "W&B run tags")
    dir: str = option("", "W&B writes its files under DIR/wandb/ (empty: RUN_DIR, so RUN_DIR/wandb/)")

    def validate(self) -> None:
        import importlib.util

        if self.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"log.wandb.mode is {self.mode} but the wandb package is not installed: "
                              "`.venv/bin/pip install wandb` (or `pip install -e '.[train]'`, which includes it), "
                              "or set log.wandb.mode=disabled")


@dataclass
class LogConfig:
    """What is reported, where."""

    interval: int = option(10, "log every this many steps")
    tensorboard: bool = option(True, "also write TensorBoard events under RUN_DIR/tensorboard")
    peak_tflops: float = option(0.0, "the device's peak TFLOP/s for MFU (0: from the device table; none on CPU)")
    wandb: WandbConfig = option(WandbConfig, "Weights & Biases")
    rank_step_times: bool = option(True, "on logging steps, gather every rank's step time (one all-gather) into "
                                   "step_time_min_s/_median_s/_max_s and slowest_rank")
    straggler_ratio: float = option(1.2, "log a warning when the slowest rank's step time is above this times the "
                                    "median's (0: never)")


@dataclass
class ValidationConfig:
    """Held-out loss."""

    path: str = option("", "token store of held-out data (empty: no validation)")
    interval: int = option(100, "validate every this many steps")
    batches: int = option(4, "global batches per validation")


# the phases of a checkpoint save, in order (megatron_code/train_checkpoint.py; faults.kill_in_save)
SAVE_PHASES = ("model", "deepspeed", "optimizer", "rng", "trainer", "checksums", "replace", "latest", "prune")


@dataclass
class FaultConfig:
    """Fault handling and injection (for tests and drills)."""

    max_consecutive_skipped: int = option(5, "stop with an error after this many skipped (NaN/Inf) steps in a row")
    collective_timeout_minutes: float = option(30.0, "timeout of every collective; the error names rank and op")
    inject_nan_steps: list[int] = option([], "make the loss NaN at these steps (fault drills)")
    exit_after_step: int = option(0, "stop the process abruptly after this step (fault drills; 0: never)")
    hang_at_step: int = option(0, "fault drill: at the start of this step the ranks in faults.hang_ranks sleep for "
                               "faults.hang_seconds before reading their batch, as a rank stuck in its data would "
                               "(shorter than the collective timeout: a straggler; longer: a hang); 0: never")
    hang_ranks: list[int] = option([0], "the ranks that faults.hang_at_step stops")
    hang_seconds: float = option(3600.0, "how long faults.hang_at_step sleeps")
    flight_recorder: bool = option(True, "a watchdog thread per rank writes RUN_DIR/flight/rank-R.json (step, "
                                   "phase, recent phases, Python stacks) when the rank makes no progress for half "
                                   "the collective timeout, and ends a rank still stuck at 1.5 times it (exit code "
                                   "124); on GPUs also NCCL's flight recorder, dumped to RUN_DIR/flight/nccl-rank-R "
                                   "on a collective timeout")
    kill_in_save: str = option("", "SIGKILL a rank at this phase of every checkpoint save (fault drills): model, "
                               "deepspeed, optimizer, rng, trainer, checksums, replace, latest or prune; '': never")


@dataclass
class ProfileConfig:
    """Profiling windows (megatron_code/observe.py): torch.profiler traces and CUDA allocator snapshots."""

    steps: list[int] = option([], "[first, last]: run torch.profiler over these steps (inclusive; CPU activities, "
                              "and CUDA on GPUs) and write DIR/rank-R.steps-FIRST-LAST.pt.trace.json.gz (Chrome "
                              "trace: Perfetto, chrome://tracing, TensorBoard); []: off")
    ranks: list[int] = option([0], "the ranks that profile and take memory snapshots")
    dir: str = option("", "where traces and snapshots go (empty: RUN_DIR/profile)")
    record_shapes: bool = option(False, "record operator input shapes in the trace (larger traces, more overhead)")
    memory_snapshot_steps: list[int] = option(
        [], "CUDA: record the allocator's history during each of these steps and dump DIR/memory-rank-R-step-N.pickle "
        "after it (open at pytorch.org/memory_viz); without CUDA a logged skip, not an error (the config is "
        "checked on hosts without GPUs)")
    memory_snapshot_entries: int = option(100_000, "allocation events kept in a memory snapshot")

    def check(self, train_steps: int) -> None:
        """The windows against the run's length: a window past train_steps or reversed names both values."""
        if self.steps:
            if len(self.steps) != 2:
                raise ConfigError(f"profile.steps ({self.steps}) must be [first, last] (two steps) or []")
            first, last = self.steps
            if first < 1 or first > last:
                raise ConfigError(f"profile.steps: first ({first}) must be at least 1 and at most last ({last})")
            if last > train_steps:
                raise ConfigError(f"profile.steps: last ({last}) is past train_steps ({train_steps})")
        outside = [s for s in self.memory_snapshot_steps if not 1 <= s <= train_steps]
        if outside:
            raise ConfigError(f"profile.memory_snapshot_steps {outside} outside the run's steps 1..{train_steps} "
                              "(train_steps)")
        if any(r < 0 for r in self.ranks) or self.memory_snapshot_entries < 1:
            raise ConfigError(f"profile.ranks ({self.ranks}) must be ranks (>= 0) and profile.memory_snapshot_entries "
                              f"({self.memory_snapshot_entries}) positive")


@dataclass
class ObjectiveConfig:
    """What the loss is on (PanGu-Coder's text-to-code objectives; see megatron_code/objectives.py and docs/modality.md).
    All but text-code-clm need a store of text-to-code pairs (built with extract.functions=true)."""

    name: Literal["text-code-clm", "code-clm", "corrupt-code-clm", "prefix-code-clm"] = option(
        "text-code-clm", "text-code-clm: every token; code-clm: code tokens only; corrupt-code-clm: code only, "
        "docstring tokens corrupted; prefix-code-clm: bidirectional docstring prefix, loss after it")
    corrupt_share: float = option(0.15, "corrupt-code-clm: share of docstring tokens picked (then [MASK] 0.8, a "
                                  "random token 0.1, kept 0.1)")


@dataclass
class TrainConfig:
    """A training run."""

    run_dir: str = option("runs/train", "logs, metrics and (by default) checkpoints go here")
    model_preset: str = option("", "start the model section from configs/model/NAME.yaml")
    model: ModelConfig = option(ModelConfig, "the model")
    tp: int = option(1, "tensor-parallel size; data-parallel size = world size / tp")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage: 0, 1, 2 or 3 (sharded over data-parallel ranks only)")
    zero: ZeroConfig = option(ZeroConfig, "ZeRO's bucket and overlap settings")
    micro_batch_size: int = option(1, "samples per forward on one rank")
    train_steps: int = option(100, "optimizer steps")
    seed: int = option(1234, "seed of initialisation and of docstring corruption (the sampler has its own)")
    init_from: str = option("", "start from these weights (a run, checkpoints, step or model directory, e.g. stage 1): optimizer "
                            "and schedule start fresh; embeddings are separated here when the model asks for it")
    init_marker_rows: Literal["mean", "keep"] = option(
        "mean", "with init_from a converted checkpoint (a released model such as CodeGeeX-13B, through model convert "
        "--to native): the embedding rows of the store's marker ids ([MASK], PanGu-Coder's markers), which that model "
        "never trained; mean: each becomes the mean of the tokenizer's other rows; keep: left as they are")
    objective: ObjectiveConfig = option(ObjectiveConfig, "the training objective")
    activation_checkpointing: Literal["off", "selective", "full"] = option(
        "off", "selective: recompute attention in backward; full: recompute every layer from its input")
    data: SamplerConfig = option(SamplerConfig, "training data (data.global_batch_size is the global batch)")
    validation: ValidationConfig = option(ValidationConfig, "held-out loss")
    optim: OptimConfig = option(OptimConfig, "optimizer and schedule")
    precision: PrecisionConfig = option(PrecisionConfig, "precision and loss scaling")
    checkpoint: CheckpointConfig = option(CheckpointConfig, "checkpoints")
    log: LogConfig = option(LogConfig, "logging")
    faults: FaultConfig = option(FaultConfig, "fault handling")
    profile: ProfileConfig = option(ProfileConfig, "profiler and memory-snapshot windows")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")
        if not 0.0 <= self.objective.corrupt_share <= 1.0:
            raise ValueError(f"objective.corrupt_share ({self.objective.corrupt_share}) must be in [0, 1]")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self.zero, name) < 1:
                raise ValueError(f"zero.{name} ({getattr(self.zero, name)}) must be positive")
        if self.train_steps < 1 or self.micro_batch_size < 1:
            raise ValueError(f"train_steps ({self.train_steps}) and micro_batch_size ({self.micro_batch_size}) "
                             "must be positive")
        self.profile.check(self.train_steps)
        if self.faults.kill_in_save and self.faults.kill_in_save not in SAVE_PHASES:
            raise ValueError(f"faults.kill_in_save ({self.faults.kill_in_save!r}) must be one of {', '.join(SAVE_PHASES)}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    def accumulation(self, dp: int) -> int:
        """Gradient accumulation steps; global batch = micro-batch x accumulation x DP, checked."""
        gbs, mbs = self.data.global_batch_size, self.micro_batch_size
        if gbs % (mbs * dp):
            raise ConfigError(f"data.global_batch_size ({gbs}) must be a multiple of micro_batch_size ({mbs}) x "
                              f"data-parallel size ({dp}) = {mbs * dp}")
        return gbs // (mbs * dp)


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(cfg: TrainConfig, cuda: bool) -> None:
    """Settle ``precision.dtype`` and ``model.params_dtype`` (either may be ``auto``) to one agreeing pair; a
    disagreement of two explicit values is refused naming both."""
    params: Any = cfg.model.params_dtype
    precision: Any = cfg.precision.dtype
    if precision == "auto":
        from_params = {v: k for k, v in PRECISION_DTYPES.items()}
        precision = from_params[params] if params != "auto" else ("bf16" if cuda else "fp32")
    if params not in ("auto", PRECISION_DTYPES[precision]):
        raise ConfigError(f"precision.dtype ({cfg.precision.dtype}) and model.params_dtype ({params}) disagree: "
                          f"{precision} trains {PRECISION_DTYPES[precision]} parameters; set one of them to match the "
                          "other, or to auto")
    resolved: Any = PRECISION_DTYPES[precision]
    cfg.precision.dtype, cfg.model.params_dtype = precision, resolved


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """Load a run's YAML; ``model_preset`` (in the file or overrides) fills the model section's defaults."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        tree = yaml.safe_load(p.read_text()) or {}
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("model_preset=")), tree.get("model_preset"))
    if preset:
        preset_file = Path(preset) if Path(preset).suffix else PRESET_DIR / f"{preset}.yaml"
        if not preset_file.is_file():
            raise ConfigError(f"model_preset {preset!r}: no {preset_file}")
        tree["model"] = {**(yaml.safe_load(preset_file.read_text()) or {}), **(tree.get("model") or {})}
    try:
        return load_config(TrainConfig, values=tree, overrides=overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
