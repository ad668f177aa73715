"""``codegeex data``: tokenizer, build, merge, inspect, encode."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.config import load_config

log = logging.getLogger("codegeex.data")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the job's configuration (flags and key=value win over it)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides, e.g. pack.mode=best_fit")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="source trees -> filtered, deduplicated, packed Arrow token store")
    p.add_argument("--input", nargs="+", action="extend", dest="inputs", help="inputs; 'default' for the embedded corpus")
    p.add_argument("--tokenizer", help="a SentencePiece .model file or a byte-level BPE directory such as "
                   "../shared/codegeex-tokenizer")
    p.add_argument("--output", help="store directory")
    p.add_argument("--seq-len", type=int, help="sequence length (windows are seq_len + 1)")
    p.add_argument("--workers", type=int, help="worker processes")
    p.add_argument("--num-shards", type=int, help="split phase A across this many machines")
    p.add_argument("--shard-index", type=int, help="this machine's part")
    p.add_argument("--force", action="store_true",
                   help="replace an output folder that holds another store or files that are not a store's")
    _common(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("merge", help="after every part of a sharded build: dedup, pack and write one manifest")
    p.add_argument("output", help="the store directory the parts wrote to")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("tokenizer", help="train the code SentencePiece model on a corpus")
    p.add_argument("--input", nargs="+", action="extend", dest="inputs", help="inputs; 'default' for the embedded corpus")
    p.add_argument("--output", help="output prefix (writes PREFIX.model, PREFIX.vocab)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--model-type", choices=["bpe", "unigram"])
    p.add_argument("--skip-existing", action="store_true", help="do nothing when PREFIX.model exists")
    _common(p)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("inspect", help="per-language counts, skip reasons and decoded samples of a store")
    p.add_argument("store")
    p.add_argument("--samples", type=int, default=3, help="decoded samples to show")
    p.add_argument("--chars", type=int, default=600, help="characters of each sample to show")
    p.add_argument("--tokenizer", help="model to decode with (default: the one the manifest names)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("encode", help='{"text": ...} JSONL -> {"text": ..., "ids": [...]} JSONL')
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model file or byte-level BPE directory (vocab.json, merges.txt)")
    p.add_argument("--input", required=True, help="JSONL file, one {\"text\": ...} object a line")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--batch", type=int, default=4096, help="lines encoded per batched call")
    p.set_defaults(func=cmd_encode)


def _flag_values(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) is not None}


def cmd_build(args: argparse.Namespace) -> int:
    from data_pipeline.build import run_build
    from data_pipeline.config import BuildConfig

    values = _flag_values(args, {"inputs": "inputs", "tokenizer": "tokenizer", "output": "output",
                                 "seq_len": "pack.seq_len", "workers": "workers", "num_shards": "num_shards",
                                 "shard_index": "shard_index"})
    cfg = load_config(BuildConfig, args.config, args.overrides, values)
    run_build(cfg, ["codegeex", *sys.argv[1:]], force=args.force)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from data_pipeline.build import WORK, merge
    from data_pipeline.config import BuildConfig

    saved = Path(args.output) / WORK / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} does not exist: no `codegeex data build` has written to {args.output}")
    from data_pipeline.build_guard import build_lock

    cfg = load_config(BuildConfig, values=json.loads(saved.read_text()))
    with build_lock(Path(args.output)):
        merge(cfg, ["codegeex", *sys.argv[1:]])
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.config import TokenizerConfig
    from data_pipeline.train_tokenizer import run_tokenizer

    values = _flag_values(args, {"inputs": "inputs", "output": "output", "vocab_size": "vocab_size",
                                 "model_type": "model_type"})
    cfg = load_config(TokenizerConfig, args.config, args.overrides, values)
    model = Path(cfg.output + ".model")
    if args.skip_existing and model.is_file():
        log.info("tokenizer %s exists; reusing it", model)
        return 0
    run_tokenizer(cfg)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from data_pipeline.inspect import inspect_store

    summary = inspect_store(args.store, args.samples, args.chars, args.tokenizer)
    out = json.dumps(summary["data"], indent=1) if args.json else summary["text"]
    sys.stdout.write(out + "\n")
    return 0



def cmd_encode(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import encode_jsonl

    encode_jsonl(args.tokenizer, args.input, args.output, args.batch)
    return 0
