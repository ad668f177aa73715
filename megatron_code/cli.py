"""``codegeex model``: info, convert, generate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("codegeex.model")


def cmd_neighbours(args: argparse.Namespace) -> int:
    from megatron_code.neighbours import cmd_neighbours as run

    return run(args)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="parameters (built on the meta device), FLOPs and memory of a preset")
    p.add_argument("--preset", required=True, help="a name from configs/model/ or a YAML path")
    p.add_argument("--seq-len", type=int, help="sequence length for FLOPs and memory (default: max positions)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the memory estimate")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="between native checkpoints, the CodeGeeX-13B layout and safetensors")
    p.add_argument("input", help="a native checkpoint directory, or a CodeGeeX .pt file with --to native")
    p.add_argument("--to", required=True, choices=["native", "codegeex", "safetensors"])
    p.add_argument("--output", required=True)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of a native output")
    p.add_argument("--head-dim", type=int, default=128, help="CodeGeeX input: head size (heads = hidden / head size)")
    p.add_argument("--fused-qkv", action="store_true", help="CodeGeeX input: build a fused-QKV native model")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="sample a completion from a checkpoint, for a quick look")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the checkpoint names)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sampling: max_new_tokens, greedy, temperature, "
                   "top_p, top_k, seed")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("neighbours", help="nearest tokens in the docstring and code embedding spaces, t-SNE plot")
    p.add_argument("--checkpoint", required=True, help="a checkpoint with separated embeddings (or a step-N dir)")
    p.add_argument("--tokens", required=True, help="comma-separated words, each one token, e.g. open,join,def,split")
    p.add_argument("--k", type=int, default=20, help="neighbours per token and space")
    p.add_argument("--output", default="neighbours.png", help="where the t-SNE plot (PNG) goes")
    p.add_argument("--tokenizer", default="", help="SentencePiece model (default: the one the checkpoint names)")
    p.set_defaults(func=cmd_neighbours)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from megatron_code.config import load_preset
    from megatron_code.flops import flops_per_token, memory_per_rank, parameter_counts
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    cfg = load_preset(args.preset, args.overrides)
    cfg.check_tensor_parallel(args.tp)
    with torch.device("meta"):
        model = CodeGeeXModel(cfg, single_context(), initialize=False)
    counts = parameter_counts(cfg)
    if model.num_parameters() != counts["total"]:
        raise RuntimeError(f"built model has {model.num_parameters():,} parameters, the formula {counts['total']:,}")
    seq = args.seq_len or cfg.max_position_embeddings
    lines = [f"{args.preset}: {counts['total']:,} parameters ({cfg.num_layers} layers"
             f"{' + top-query layer' if cfg.top_query_layer else ''}, hidden {cfg.hidden_size}, "
             f"{cfg.num_attention_heads} heads of {cfg.head_dim}, FFN {cfg.ffn_hidden_size}, vocabulary {cfg.vocab_size})"]
    lines += [f"  {k:<22}{v:>18,}" for k, v in counts.items() if k != "total"]
    lines.append(f"training FLOPs per token at sequence {seq}: {flops_per_token(cfg, seq):.4g} (Megatron's full-square "
                 f"attention), {flops_per_token(cfg, seq, convention='causal'):.4g} (causal, one document)")
    for recompute in ("off", "selective", "full"):
        m = memory_per_rank(cfg, tp=args.tp, micro_batch=1, seq_len=seq, recompute=recompute)
        lines.append(f"memory per rank, TP={args.tp}, DP=1, no ZeRO, micro-batch 1, bf16, recompute {recompute}: "
                     f"{m.total / 2**30:.1f} GiB (parameters {m.parameters / 2**30:.1f}, gradients "
                     f"{m.gradients / 2**30:.1f}, Adam {m.optimizer / 2**30:.1f}, activations {m.activations / 2**30:.1f}, "
                     f"logits {m.transient / 2**30:.1f})")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from megatron_code.checkpoint import full_state, model_config, new_manifest, tensor_specs, write_full_state
    from megatron_code.codegeex_format import from_codegeex, load_codegeex_file, to_codegeex
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    if args.to == "native" and Path(args.input).is_file():  # a CodeGeeX file
        cfg, state = from_codegeex(load_codegeex_file(args.input), head_dim=args.head_dim, fused_qkv=args.fused_qkv)
        with torch.device("meta"):
            specs = tensor_specs(CodeGeeXModel(cfg, single_context(), initialize=False))
        manifest = new_manifest(cfg, specs, tp_size=1, converted_from=str(args.input))
        write_full_state(args.output, manifest, state, args.tp)
    else:
        manifest, state = full_state(args.input)
        if args.to == "native":
            write_full_state(args.output, manifest, state, args.tp)
        elif args.to == "codegeex":
            torch.save(to_codegeex(state, model_config(manifest)), args.output)
        else:
            meta = {"format": "codegeex-safetensors", "model": json.dumps(manifest.model)}
            save_file({k: v.contiguous() for k, v in state.items()}, args.output, metadata=meta)
    log.info("wrote %s (%s)", args.output, args.to)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from common.config import load_config
    from data_pipeline.tokenizer import CodeTokenizer
    from megatron_code.checkpoint import load_model, read_manifest
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.parallel import single_context

    tok_path = read_manifest(args.checkpoint).tokenizer_path(args.tokenizer, args.checkpoint)
    tok = CodeTokenizer(tok_path)
    model = load_model(args.checkpoint, single_context())
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} pieces, more than the model's vocab_size "
                         f"({model.cfg.vocab_size})")
    cfg = load_config(SamplingConfig, overrides=args.overrides)
    outs = generate(model, [tok.encode(p) for p in args.prompt], cfg, pad_id=tok.pad_id, eod_id=tok.eod_id,
                    vocab_limit=tok.vocab_size)
    for prompt, out in zip(args.prompt, outs):
        sys.stdout.write(prompt + tok.decode(out) + "\n")
    return 0
