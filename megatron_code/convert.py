"""Checkpoint conversion (``codegeex model convert``): a native checkpoint to another TP size, to the CodeGeeX-13B
layout or to one safetensors file, and a CodeGeeX file to a native checkpoint. Everything goes through the TP=1
state, on the CPU, without a process group beyond the one-rank context the meta-device model needs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import save_file

from megatron_code.checkpoint import full_state, model_config, new_manifest, tensor_specs, write_full_state
from megatron_code.codegeex_format import from_codegeex, load_codegeex_file, to_codegeex
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import single_context

log = logging.getLogger("codegeex.model")

Target = Literal["native", "codegeex", "safetensors"]
TARGETS: tuple[str, ...] = get_args(Target)


def import_codegeex(source: str | Path, output: str | Path, tp: int = 1, head_dim: int = 128,
                    fused_qkv: bool = False) -> None:
    """A CodeGeeX .pt file -> a native ``tp``-way checkpoint (heads = hidden / ``head_dim``)."""
    cfg, state = from_codegeex(load_codegeex_file(source), head_dim=head_dim, fused_qkv=fused_qkv)
    with torch.device("meta"):
        specs = tensor_specs(CodeGeeXModel(cfg, single_context(), initialize=False))
    write_full_state(output, new_manifest(cfg, specs, tp_size=1, converted_from=str(source)), state, tp)


def convert_checkpoint(source: str | Path, output: str | Path, to: Target, tp: int = 1, head_dim: int = 128,
                       fused_qkv: bool = False) -> None:
    """Convert ``source`` (a native checkpoint directory, or a CodeGeeX file when ``to`` is native) to ``output``:
    native (``tp``-way), codegeex (a .pt file) or safetensors (one TP=1 file, the model config in its metadata).
    ``head_dim`` and ``fused_qkv`` shape the model built from a CodeGeeX file."""
    if to not in TARGETS:
        raise ValueError(f"conversion target {to!r} must be one of {', '.join(TARGETS)}")
    if to == "native" and Path(source).is_file():
        import_codegeex(source, output, tp, head_dim, fused_qkv)
    else:
        manifest, state = full_state(source)
        if to == "native":
            write_full_state(output, manifest, state, tp)
        elif to == "codegeex":
            torch.save(to_codegeex(state, model_config(manifest)), output)
        else:
            meta = {"format": "codegeex-safetensors", "model": json.dumps(manifest.model)}
            save_file({k: v.contiguous() for k, v in state.items()}, str(output), metadata=meta)
    log.info("wrote %s (%s)", output, to)
