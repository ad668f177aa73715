"""Model configuration: one dataclass, presets as YAML files in ``configs/model/``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.config import ConfigError, load_config, option

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


@dataclass
class ModelConfig:
    """A CodeGeeX-shaped decoder: pre-LayerNorm layers, learned positions, a top-query layer, tied output."""

    num_layers: int = option(2, "transformer layers below the top-query layer")
    hidden_size: int = option(64, "model width")
    num_attention_heads: int = option(4, "attention heads (hidden_size / heads is the head size)")
    ffn_hidden_size: int = option(256, "MLP inner width (not gated)")
    vocab_size: int = option(1024, "rows of the word embedding: the tokenizer's vocabulary padded (CodeGeeX: 52224)")
    max_position_embeddings: int = option(256, "learned absolute positions (and top-query embedding rows)")
    top_query_layer: bool = option(True, "add PanGu-alpha/CodeGeeX's top-query layer after the final LayerNorm")
    layernorm_epsilon: float = option(1e-5, "LayerNorm epsilon (LayerNorm is computed in fp32)")
    hidden_dropout: float = option(0.0, "dropout after attention and MLP outputs and on embeddings")
    attention_dropout: float = option(0.0, "dropout on attention probabilities")
    init_method_std: float = option(0.02, "std of the normal init; output projections use std / sqrt(2 * layers)")
    fused_qkv: bool = option(False, "one QKV projection (heads interleaved as [head, q/k/v, dim]) instead of three")
    attention_backend: Literal["auto", "sdpa", "flex", "flash"] = option(
        "auto", "sdpa: dense mask, any device, any use; flex: FlexAttention block mask (GPU; no attention dropout); "
        "flash: flash-attn varlen (GPU; training without prefix); resolved once per use (train, prefix, cache): auto "
        "takes flash, then flex, then sdpa on GPU, sdpa on CPU; a use an explicit choice cannot run takes auto's")
    params_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "parameter dtype; auto: the training precision's (float32 outside training)")
    sequence_parallel: bool = option(False, "Megatron's sequence parallelism (TP > 1): LayerNorm, dropout, bias and "
                                     "residual work and their activations split over the sequence, [s, b, h] layout")
    fused_elementwise: bool = option(True, "on GPUs, bias + FastGELU and bias + dropout + add as single compiled "
                                     "kernels (torch.compile); the CPU runs the plain path")
    embedding_separation: Literal["none", "full", "partial"] = option(
        "none", "modality-relative embeddings (PanGu-Coder): full: a second vocab-parallel table for docstring tokens; "
        "partial: own docstring rows only for separated_token_ids; the output layer stays tied to the code table")
    separated_token_ids: list[int] = option([], "partial separation: token ids with their own docstring rows (filled "
                                            "by stage 2 from the tokenizer: the language's keywords and built-ins)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_layers(self) -> int:
        return self.num_layers + int(self.top_query_layer)

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        bad = [i for i in self.separated_token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"separated_token_ids {bad[:5]} are outside the vocabulary (vocab_size {self.vocab_size})")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be in [0, 1)")

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise naming both values when the model cannot be split ``tp`` ways."""
        for name in ("num_attention_heads", "ffn_hidden_size", "vocab_size", "hidden_size"):
            value = getattr(self, name)
            if value % tp:
                raise ConfigError(f"{name} ({value}) must be a multiple of tensor_model_parallel_size ({tp})")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """A preset from ``configs/model/NAME.yaml`` (or a path to a YAML file), with ``key=value`` overrides."""
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(preset_names())}")
    return load_config(ModelConfig, path, overrides or [])
