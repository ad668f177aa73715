"""``codegeex model``: info, convert, generate, neighbours. Each command parses its arguments and calls one library
function (:mod:`megatron_code.info`, :mod:`megatron_code.convert`, :mod:`megatron_code.generation`,
:mod:`megatron_code.neighbours`); heavy imports happen inside the handlers, so ``codegeex --help`` stays fast."""

from __future__ import annotations

import argparse
import sys

CONVERT_TARGETS = ("native", "codegeex", "safetensors", "hf")  # megatron_code.convert.TARGETS, without importing torch


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="parameters (built on the meta device), FLOPs and memory of a preset")
    p.add_argument("--preset", required=True, help="a name from configs/model/ or a YAML path")
    p.add_argument("--seq-len", type=int, help="sequence length for FLOPs and memory (default: max positions)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the memory estimate")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="between native checkpoints, the CodeGeeX-13B layout, safetensors and a "
                       "Hugging Face directory")
    p.add_argument("input", help="a native checkpoint (a run, checkpoints, step-N or model directory), or a CodeGeeX "
                   ".pt file with --to native")
    p.add_argument("--to", required=True, choices=CONVERT_TARGETS)
    p.add_argument("--output", required=True, help="a directory (native: created; an existing one must be a "
                   "checkpoint, which is replaced; hf: created, an existing one must be an export) or a file "
                   "(codegeex, safetensors)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of a native output")
    p.add_argument("--head-dim", type=int, default=128, help="CodeGeeX input: head size (heads = hidden / head size)")
    p.add_argument("--fused-qkv", action="store_true", help="CodeGeeX input: build a fused-QKV native model")
    p.add_argument("--tokenizer", help="tokenizer a native output carries: SentencePiece .model or BPE directory "
                   "(default: the input's; a CodeGeeX .pt file records none)")
    p.add_argument("--trim-vocab", action="store_true", help="hf output: drop the embedding's padding rows beyond "
                   "the tokenizer's vocabulary (config.json's vocab_trimmed says which)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="sample a completion from a checkpoint, for a quick look")
    p.add_argument("--checkpoint", required=True, help="a run, checkpoints, step-N or model directory")
    p.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    p.add_argument("--tokenizer",
                   help="SentencePiece .model or BPE directory (default: the one the checkpoint carries)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sampling: max_new_tokens, greedy, temperature, "
                   "top_p, top_k, seed")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("neighbours", help="nearest tokens in the docstring and code embedding spaces, t-SNE plot")
    p.add_argument("--checkpoint", required=True, help="a checkpoint with separated embeddings (a run, checkpoints, "
                   "step-N or model directory)")
    p.add_argument("--tokens", required=True, help="comma-separated words, each one token, e.g. open,join,def,split")
    p.add_argument("--k", type=int, default=20, help="neighbours per token and space")
    p.add_argument("--output", default="neighbours.png", help="where the t-SNE plot (PNG) goes")
    p.add_argument("--tokenizer",
                   help="SentencePiece .model or BPE directory (default: the one the checkpoint carries)")
    p.set_defaults(func=cmd_neighbours)


def cmd_info(args: argparse.Namespace) -> int:
    from megatron_code.config import load_preset
    from megatron_code.info import model_info

    cfg = load_preset(args.preset, args.overrides)
    sys.stdout.write(model_info(cfg, args.preset, seq_len=args.seq_len, tp=args.tp))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from megatron_code.convert import convert_checkpoint

    convert_checkpoint(args.input, args.output, args.to, tp=args.tp, head_dim=args.head_dim, fused_qkv=args.fused_qkv,
                       tokenizer=args.tokenizer, trim_vocab=args.trim_vocab)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from common.config import load_config
    from megatron_code.generation import SamplingConfig, generate_text

    sampling = load_config(SamplingConfig, overrides=args.overrides)
    for text in generate_text(args.checkpoint, args.prompt, sampling, tokenizer=args.tokenizer):
        sys.stdout.write(text + "\n")
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    from megatron_code.neighbours import token_neighbours

    words = [w for w in args.tokens.split(",") if w]
    token_neighbours(args.checkpoint, words, k=args.k, output=args.output, tokenizer=args.tokenizer)
    return 0
