"""The released CodeGeeX-13B PyTorch layout, imported and exported without unpickling anything but tensors.

The file holds ``{"module": {"language_model": {...}}}`` where ``language_model`` has ``embedding``
(``word_embeddings.weight``, ``position_embeddings.weight``), ``topQueryEmbedding``
(``top_query_embeddings.weight``) and ``transformer`` (``layers.{i}.{input_layernorm, attention.{query, key, value,
dense}, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}.{weight, bias}``, ``topQueryLayer.*``,
``final_layernorm.*``): 645 tensors for the 13B model. Sections may be nested dictionaries or dotted keys.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.config import load_config
from megatron_code.config import ModelConfig

_PREFIXES = [  # (CodeGeeX name prefix, our name prefix), most specific first
    ("embedding.word_embeddings.", "word_embeddings."),
    ("embedding.position_embeddings.", "position_embeddings."),
    ("topQueryEmbedding.top_query_embeddings.", "top_query_embeddings."),
    ("transformer.topQueryLayer.", "top_query_layer."),
    ("transformer.final_layernorm.", "final_layernorm."),
    ("transformer.layers.", "layers."),
]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, Tensor):
            out[f"{prefix}{k}"] = v
    return out


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for src, dst in table:
        if name.startswith(src):
            return dst + name[len(src):]
    raise ValueError(f"tensor {name!r} has no counterpart in the other layout")


def load_codegeex_file(path: str | Path) -> dict[str, Tensor]:
    """Flat CodeGeeX names -> tensors, with ``torch.load(weights_only=True)``, memory-mapped where the format allows."""
    try:
        try:  # memory-mapped: the 26 GB release is paged in as its tensors are resharded, not read whole first
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zipfile) format cannot be mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused: the file holds objects other than tensors and plain containers, and "
                         f"loading it would unpickle arbitrary code ({str(exc).splitlines()[0]})") from None
    try:
        lm = obj["module"]["language_model"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not the CodeGeeX layout (no ['module']['language_model'])") from None
    return _flatten(lm)


def _split_fused(state: dict[str, Tensor], heads: int) -> dict[str, Tensor]:
    """Our fused query_key_value ([head, q/k/v, dim] rows) -> separate query, key, value."""
    out = {}
    for name, t in state.items():
        if ".attention.query_key_value." not in name:
            out[name] = t
            continue
        base, kind = name.split(".attention.query_key_value.")
        parts = t.view(heads, 3, -1, *t.shape[1:])
        for i, proj in enumerate(("query", "key", "value")):
            out[f"{base}.attention.{proj}.{kind}"] = parts[:, i].reshape(-1, *t.shape[1:]).clone()
    return out


def _fuse(state: dict[str, Tensor], heads: int) -> dict[str, Tensor]:
    """Separate query, key, value of the regular layers -> our fused layout (the top-query layer stays separate)."""
    out = {k: v for k, v in state.items() if not (k.startswith("layers.") and ".attention.query." in k
                                                  or k.startswith("layers.") and ".attention.key." in k
                                                  or k.startswith("layers.") and ".attention.value." in k)}
    for name in [k for k in state if k.startswith("layers.") and ".attention.query." in k]:
        base, kind = name.split(".attention.query.")
        qkv = [state[f"{base}.attention.{p}.{kind}"] for p in ("query", "key", "value")]
        stacked = torch.stack([q.view(heads, -1, *q.shape[1:]) for q in qkv], dim=1)  # (heads, 3, D, ...)
        out[f"{base}.attention.query_key_value.{kind}"] = stacked.reshape(-1, *qkv[0].shape[1:])
    return out


def to_codegeex(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Any]:
    """Our TP=1 state -> the CodeGeeX file's object (nested like the release)."""
    flat = _split_fused(state, cfg.num_attention_heads) if cfg.fused_qkv else state
    table = [(ours, theirs) for theirs, ours in _PREFIXES]
    lm: dict[str, Any] = {"embedding": {}, "topQueryEmbedding": {}, "transformer": {}}
    for name, t in flat.items():
        theirs = _rename(name, table)
        section, rest = theirs.split(".", 1)
        if section == "transformer":
            lm["transformer"][rest] = t
        else:
            module, leaf = rest.rsplit(".", 1)
            lm[section].setdefault(module, {})[leaf] = t
    return {"module": {"language_model": lm}}


def from_codegeex(flat: dict[str, Tensor], head_dim: int = 128,
                  fused_qkv: bool = False) -> tuple[ModelConfig, dict[str, Tensor]]:
    """CodeGeeX tensors -> (the model config their shapes give, without dropout; our TP=1 state)."""
    state = {_rename(k, _PREFIXES): v for k, v in flat.items()}
    vocab, hidden = state["word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    cfg = load_config(ModelConfig, values={
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": hidden // head_dim,
        "ffn_hidden_size": state["layers.0.mlp.dense_h_to_4h.weight"].shape[0], "vocab_size": vocab,
        "max_position_embeddings": state["position_embeddings.weight"].shape[0],
        "top_query_layer": "top_query_layer.attention.query.weight" in state, "fused_qkv": fused_qkv,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "params_dtype": {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(
            state["word_embeddings.weight"].dtype, "auto")})  # fp32 weights: whatever precision trains them next
    return cfg, (_fuse(state, cfg.num_attention_heads) if fused_qkv else state)
