"""The configuration of ``codegeex eval generate`` (and of ``eval watch``'s generation), read by the driver
(:mod:`eval_harness.generate`) and the backends (:mod:`eval_harness.backends`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from common.config import ConfigError
from common.contracts import CheckpointManifest, PairLayout
from eval_harness.tasks import TaskSet

log = logging.getLogger("codegeex.eval")
PromptFormat = Literal["auto", "plain", "pairs"]  # pairs: the checkpoint's text-to-code pair layout (auto: if it has one)
PrefixLM = Literal["auto", "on", "off"]  # bidirectional attention over the docstring prefix (auto: prefix-code-clm)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
BackendName = Literal["native", "hf", "vllm"]


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate, with which backend, and how to sample it."""

    data: str = ""  # HumanEval-X directory
    mbpp: str = ""  # mbpp.jsonl, for TaskSet.MBPP (its test split, ids 11-510)
    tokenizer: str = ""  # SentencePiece model ("": the one the checkpoint names; native only)
    task: TaskSet = TaskSet.HUMANEVAL_X
    prompt_format: PromptFormat = "auto"
    prefix_lm: PrefixLM = "auto"
    languages: str = "all"
    problems: int = 0  # only the first N problems per language (0: all)
    n: int = 1  # samples per task
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    max_new_tokens: int = 1024
    batch_size: int = 16
    seed: int = 1234
    backend: BackendName = "native"
    model: str = ""  # hf, vllm: the model directory (save_pretrained's)
    tp: int = 1  # tensor-parallel size (native: of each data-parallel replica; vllm: its own)
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU

    def validate(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1 or self.tp < 1:
            raise ConfigError(f"--n ({self.n}), --batch-size ({self.batch_size}), --max-new-tokens "
                              f"({self.max_new_tokens}) and --tp ({self.tp}) must be at least 1")
        if not self.greedy and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ConfigError(f"--temperature ({self.temperature}) must be positive and --top-p ({self.top_p}) in "
                              "(0, 1], or pass --greedy")
        if self.backend == "hf" and self.tp != 1:
            raise ConfigError(f"--tp ({self.tp}) is for --backend native and vllm; hf runs a whole model per rank "
                              "(start several ranks with `codegeex launch local --nproc N -- eval generate ...`)")
        if self.backend != "native" and (self.prompt_format == "pairs" or self.prefix_lm == "on" or self.tokenizer):
            raise ConfigError(f"--prompt-format pairs, --prefix-lm on and --tokenizer are for native checkpoints; "
                              f"--backend {self.backend} uses the model directory's own tokenizer and plain prompts")


def prompt_format(cfg: GenerateConfig, manifest: CheckpointManifest) -> tuple[PairLayout | None, bool]:
    """(the pair layout to prompt with, or None for plain prompts; whether the docstring prefix is bidirectional)."""
    pairs = manifest.pairs
    if cfg.prompt_format == "pairs" and not pairs:
        log.warning("the checkpoint records no pair layout; prompting with docstring_first, no whitespace markers")
    use = cfg.prompt_format == "pairs" or (cfg.prompt_format == "auto" and pairs is not None)
    fmt = pairs or PairLayout()
    prefix = cfg.prefix_lm == "on" or (cfg.prefix_lm == "auto" and manifest.objective == "prefix-code-clm")
    return (fmt if use else None), prefix
