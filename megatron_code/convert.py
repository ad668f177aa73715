"""Checkpoint conversion (``codegeex model convert``): a native checkpoint to another TP size, to the CodeGeeX-13B
layout, to one safetensors file or to a Hugging Face directory (:mod:`megatron_code.hf_export`), and a CodeGeeX
file to a native checkpoint. Everything goes through the TP=1 state, on the CPU, without a process group beyond the
one-rank context the meta-device model needs.

A native input is anything :func:`~megatron_code.checkpoint.resolve_model_dir` takes (a run, checkpoints, step-N or
model directory). A native output carries the tokenizer (the input's, or ``tokenizer``); outputs are created with
their parent folders, and an existing folder that is not a checkpoint is never replaced."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import save_file

from common.contracts import CheckpointManifest, TokenizerRecord
from common.io import FILE_MODE
from megatron_code.checkpoint import (
    full_state,
    model_config,
    new_manifest,
    resolve_model_dir,
    tensor_specs,
    write_full_state,
)
from megatron_code.codegeex_format import from_codegeex, load_codegeex_file, to_codegeex
from megatron_code.hf_export import export_hf
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import single_context

log = logging.getLogger("codegeex.model")

Target = Literal["native", "codegeex", "safetensors", "hf"]
TARGETS: tuple[str, ...] = get_args(Target)


def tokenizer_record(path: str | Path, vocab_limit: int) -> TokenizerRecord:
    """The record of the tokenizer ``path`` (a SentencePiece model or a BPE directory: fingerprint and ids); refused
    when it has more entries than the model's vocabulary (``vocab_limit``), naming both."""
    from data_pipeline import tokenizer as tokenizers

    tok = tokenizers.load_tokenizer(path)
    tokenizers.check_vocab_fits(tok, vocab_limit)
    return tokenizers.tokenizer_record(tok)


def import_codegeex(source: str | Path, output: str | Path, tp: int = 1, head_dim: int = 128,
                    fused_qkv: bool = False, tokenizer: str | Path | None = None) -> None:
    """A CodeGeeX .pt file -> a native ``tp``-way checkpoint (heads = hidden / ``head_dim``), carrying ``tokenizer``
    (the .pt layout records none)."""
    cfg, state = from_codegeex(load_codegeex_file(source), head_dim=head_dim, fused_qkv=fused_qkv)
    record = tokenizer_record(tokenizer, cfg.vocab_size) if tokenizer else None
    with torch.device("meta"):
        specs = tensor_specs(CodeGeeXModel(cfg, single_context(), initialize=False))
    write_full_state(output, new_manifest(cfg, specs, tp_size=1, tokenizer=record, converted_from=str(source)), state,
                     tp, tokenizer=tokenizer)


def _native_tokenizer(manifest: CheckpointManifest, ckpt: Path,
                      override: str | Path | None) -> tuple[TokenizerRecord | None, Path | None]:
    """(the record, the file) of the tokenizer a native output carries: ``override``, else the input's (checked
    against its sha256); the input's record without a file, with a warning, when its file is nowhere to be found."""
    if override:
        return tokenizer_record(override, model_config(manifest).vocab_size), Path(override)
    record = manifest.tokenizer
    if record is None or not record.path:
        return record, None
    try:
        return record, Path(manifest.tokenizer_path(None, ckpt))
    except FileNotFoundError as exc:
        log.warning("%s; the converted checkpoint does not carry it", exc)
        return record, None


def _file_output(output: str | Path, to: str) -> Path:
    """A single-file output's path, its folder created; refused when it is a directory."""
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"{out} is a directory: --to {to} writes one file; name the file")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _write_file(out: Path, write: Callable[[Path], object]) -> None:
    """Write ``out`` through ``write(tmp_path)`` beside it, then rename it over ``out`` (mode 0644)."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        tmp.chmod(FILE_MODE)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def convert_checkpoint(source: str | Path, output: str | Path, to: Target, tp: int = 1, head_dim: int = 128,
                       fused_qkv: bool = False, tokenizer: str | Path | None = None, trim_vocab: bool = False) -> None:
    """Convert ``source`` (a native checkpoint, or a CodeGeeX file when ``to`` is native) to ``output``: native
    (``tp``-way, carrying the tokenizer: ``tokenizer`` or the input's), codegeex (a .pt file), safetensors (one
    TP=1 file, the model config in its metadata) or hf (a Hugging Face directory; ``trim_vocab``: drop the padded
    vocabulary rows). ``head_dim`` and ``fused_qkv`` shape the model built from a CodeGeeX file."""
    if to not in TARGETS:
        raise ValueError(f"conversion target {to!r} must be one of {', '.join(TARGETS)}")
    if tokenizer and to != "native":
        raise ValueError(f"--tokenizer: only a native checkpoint carries a tokenizer, not --to {to}")
    if trim_vocab and to != "hf":
        raise ValueError(f"--trim-vocab applies to --to hf only, not --to {to}")
    if to == "hf":
        export_hf(source, output, trim_vocab=trim_vocab)
        return
    if to == "native" and Path(source).is_file():
        import_codegeex(source, output, tp, head_dim, fused_qkv, tokenizer)
        log.info("wrote %s (%s)", output, to)
        return
    ckpt = resolve_model_dir(source)
    manifest, state = full_state(ckpt)
    if to == "native":
        record, file = _native_tokenizer(manifest, ckpt, tokenizer)
        write_full_state(output, dataclasses.replace(manifest, tokenizer=record), state, tp, tokenizer=file)
    elif to == "codegeex":
        obj = to_codegeex(state, model_config(manifest))
        _write_file(_file_output(output, to), lambda tmp: torch.save(obj, tmp))
    else:
        meta = {"format": "codegeex-safetensors", "model": json.dumps(manifest.model)}
        tensors = {k: v.contiguous() for k, v in state.items()}
        _write_file(_file_output(output, to), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    log.info("wrote %s (%s)", output, to)
