"""A native checkpoint as a Hugging Face ``transformers`` model directory (``codegeex model convert --to hf``).

The directory, loaded with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (and the tokenizer
with ``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``), needs neither this project nor Megatron::

    DIR/config.json                    model_type "codegeex", every architecture field, auto_map to the files below
    DIR/model.safetensors              the TP=1 weights under the modeling file's names (QKV split when fused)
    DIR/configuration_codegeex.py      copied from megatron_code/hf_template/ (plain transformers + PyTorch)
    DIR/modeling_codegeex.py
    DIR/tokenizer.model                the checkpoint's SentencePiece model, when it carries one
    DIR/tokenization_codegeex.py       and its tokenizer class, tokenizer_config.json, special_tokens_map.json
    DIR/tokenizer.json                 or, for a byte-level BPE (CodeGeeX's), the whole tokenizer with CodeGeeX's
                                       whitespace rule as its normaliser (PreTrainedTokenizerFast, no remote code),
                                       beside vocab.json, merges.txt and added_tokens.json

Vocabulary: ``vocab_size`` is the embedding's rows as stored (the tokenizer's size padded), or with ``trim_vocab``
the tokenizer's size (the padding rows dropped: logits over real tokens only); ``vocab_trimmed`` says which and
``tokenizer_vocab_size`` records the tokenizer's real size either way. Separated docstring embeddings (stage 2) are
not exported: the exported model embeds every token with the code table, as generation does."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from common.contracts import CheckpointManifest
from common.io import DIR_MODE, FILE_MODE
from megatron_code.checkpoint import full_state, model_config, resolve_model_dir
from megatron_code.config import ModelConfig

log = logging.getLogger("codegeex.model")

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
MODEL_FILES = ("configuration_codegeex.py", "modeling_codegeex.py")
TOKENIZER_FILES = ("tokenization_codegeex.py",)
AUTO_MAP = {"AutoConfig": "configuration_codegeex.CodeGeeXConfig",
            "AutoModelForCausalLM": "modeling_codegeex.CodeGeeXForCausalLM"}
_SKIPPED = ("docstring_embeddings.",)  # stage 2's second table: not part of the exported model


def hf_state(state: dict[str, Tensor], cfg: ModelConfig, vocab_rows: int) -> dict[str, Tensor]:
    """The TP=1 state -> the modeling file's names (``transformer.`` + ours), a fused QKV (rows [head, q/k/v, D])
    split into query, key and value, the word embedding cut to its first ``vocab_rows`` rows."""
    heads, d, c = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state") or name.startswith(_SKIPPED):
            continue
        if ".query_key_value." in name:
            parts = tensor.view(heads, 3, d, *tensor.shape[1:])  # (H, 3, D[, C])
            for i, which in enumerate(("query", "key", "value")):
                split = parts[:, i].reshape(c, *tensor.shape[1:])  # (C[, C])
                out["transformer." + name.replace("query_key_value", which)] = split.contiguous()
            continue
        if name == "word_embeddings.weight":
            tensor = tensor[:vocab_rows]  # (V', C)
        out["transformer." + name] = tensor.contiguous()
    return out


def hf_config(cfg: ModelConfig, manifest: CheckpointManifest, vocab_rows: int, dtype: torch.dtype) -> dict[str, Any]:
    """config.json: every architecture field, the vocabulary as exported, the tokenizer's ids, the auto_map."""
    record = manifest.tokenizer
    config: dict[str, Any] = {
        "model_type": "codegeex", "architectures": ["CodeGeeXForCausalLM"], "auto_map": AUTO_MAP,
        "vocab_size": vocab_rows, "vocab_trimmed": vocab_rows != cfg.vocab_size,
        "tokenizer_vocab_size": record.vocab_size if record else 0, "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "ffn_hidden_size": cfg.ffn_hidden_size, "max_position_embeddings": cfg.max_position_embeddings,
        "layernorm_epsilon": cfg.layernorm_epsilon, "top_query_layer": cfg.top_query_layer,
        "initializer_range": cfg.init_method_std, "tie_word_embeddings": True, "use_cache": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if record is not None and record.eod_id >= 0:
        config["eos_token_id"] = record.eod_id
    if record is not None and record.pad_id >= 0:
        config["pad_token_id"] = record.pad_id
    return config


def _vocab_rows(cfg: ModelConfig, manifest: CheckpointManifest, trim: bool, ckpt: Path) -> int:
    """The word embedding's rows to export: all, or (``trim``) the tokenizer's size."""
    if not trim:
        return cfg.vocab_size
    record = manifest.tokenizer
    if record is None or record.vocab_size <= 0:
        raise ValueError(f"{ckpt}: --trim-vocab needs the tokenizer's size, and the checkpoint records no tokenizer")
    if record.vocab_size > cfg.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer vocab_size ({record.vocab_size}) exceeds the model's vocab_size "
                         f"({cfg.vocab_size})")
    return record.vocab_size


def _write_tokenizer(out: Path, manifest: CheckpointManifest, ckpt: Path) -> bool:
    """Copy the checkpoint's SentencePiece model and its tokenizer class into ``out``; False when it has none."""
    record = manifest.tokenizer
    if record is None or not record.path:
        log.warning("%s carries no tokenizer; the export has none (AutoTokenizer will not load it)", ckpt)
        return False
    path = Path(manifest.tokenizer_path(None, ckpt))  # checked against its sha256
    if path.is_dir():
        _write_bpe_tokenizer(out, path, model_config(manifest).max_position_embeddings)
        return True
    shutil.copyfile(path, out / "tokenizer.model")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TEMPLATE_DIR / name, out / name)
    from data_pipeline.tokenizer import CodeTokenizer

    tok = CodeTokenizer(path)
    special = {"eos_token": tok.sp.id_to_piece(tok.eod_id), "pad_token": tok.sp.id_to_piece(tok.pad_id),
               "unk_token": tok.sp.id_to_piece(tok.sp.unk_id())}
    tok_config = {"tokenizer_class": "CodeGeeXTokenizer", **special, "clean_up_tokenization_spaces": False,
                  "split_special_tokens": True, "model_max_length": model_config(manifest).max_position_embeddings,
                  "auto_map": {"AutoTokenizer": ["tokenization_codegeex.CodeGeeXTokenizer", None]}}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return True


def _write_bpe_tokenizer(out: Path, path: Path, context: int) -> None:
    """CodeGeeX's tokenizer as ``tokenizer.json`` (every step in it: normaliser, added tokens, BPE, decoder), which
    ``AutoTokenizer`` loads as a ``PreTrainedTokenizerFast`` giving our ids."""
    from common.contracts import BPE_CARRIED
    from data_pipeline.bpe_tokenizer import CodeGeeXTokenizer

    tok = CodeGeeXTokenizer(path)
    tok.tok.save(str(out / "tokenizer.json"))
    for name in BPE_CARRIED[:3]:  # the released files, for reference; tokenizer.json is what loads
        if (path / name).is_file():
            shutil.copyfile(path / name, out / name)
    eod = next(tok.pieces([tok.eod_id]))
    special = {"bos_token": eod, "eos_token": eod, "unk_token": eod, "pad_token": eod}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False,
                  "add_prefix_space": False, "model_max_length": context}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _check_output(out: Path) -> None:
    """Refuse to replace ``out`` unless it is missing, an empty directory or an earlier export (a codegeex
    config.json)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file: --to hf writes a directory")
    config = out / "config.json"
    if any(out.iterdir()) and not (config.is_file() and json.loads(config.read_text()).get("model_type") == "codegeex"):
        raise ValueError(f"{out} is a non-empty directory that is not a Hugging Face codegeex export; refusing to "
                         "replace it")


def export_hf(source: str | Path, output: str | Path, trim_vocab: bool = False) -> Path:
    """Write the Hugging Face directory of the native checkpoint ``source`` to ``output`` (built beside it, then
    renamed into place; an earlier export there is replaced); returns the output's path."""
    ckpt = resolve_model_dir(source)
    manifest, state = full_state(ckpt)
    cfg = model_config(manifest)
    rows = _vocab_rows(cfg, manifest, trim_vocab, ckpt)
    if cfg.embedding_separation != "none":
        log.warning("%s: separated docstring embeddings (%s) are not exported; every token uses the code table",
                    ckpt, cfg.embedding_separation)
    out = Path(output)
    _check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = hf_state(state, cfg, rows)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dtype = state["word_embeddings.weight"].dtype
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, manifest, rows, dtype), indent=2) + "\n")
        for name in MODEL_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        _write_tokenizer(tmp, manifest, ckpt)
        for p in tmp.iterdir():
            p.chmod(FILE_MODE)
        tmp.chmod(DIR_MODE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (hf: %d tensors, vocab %d of %d rows)", out, len(tensors), rows, cfg.vocab_size)
    return out
