"""Native generation (``megatron_code.generation.generate``: preallocated KV cache, last-position logits, one host
sync per step) against Hugging Face ``generate()`` of a GPT-2 with the same layers, hidden size, heads and
vocabulary, on the same prompts, in one process, alternating runs.

Both models have random weights (speed does not depend on them) and generate exactly ``--new-tokens`` tokens for
every prompt (no end token, no stop rule), with the same sampling settings (temperature 0.8, top-p 0.95) or greedy.
Tokens/s counts generated tokens only; the prompts' prefill is inside the timing.

    python -m benchmarks.generation_speed --preset pangu-coder-100m --batch 16 --new-tokens 64
    python -m benchmarks.generation_speed --preset pangu-coder-100m --batch 16 --new-tokens 64 --same-prompt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.io import write_json_atomic


def prompts(batch: int, vocab: int, seed: int, lengths: tuple[int, int], same: bool = False) -> list[list[int]]:
    """``batch`` random prompts with lengths spread like HumanEval's (120-300 tokens by default); ``same``: one
    prompt ``batch`` times (n samples of one problem, as bigcode-evaluation-harness batches them)."""
    rng = np.random.default_rng(seed)
    made = [rng.integers(10, vocab, size=int(rng.integers(*lengths))).tolist() for _ in range(1 if same else batch)]
    return made * batch if same else made


def native_model(preset: str) -> Any:
    from megatron_code.config import load_preset
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    cfg = load_preset(preset, ["hidden_dropout=0", "attention_dropout=0"])
    torch.manual_seed(0)
    return CodeGeeXModel(cfg, single_context()).eval()


def gpt2_like(cfg: Any) -> Any:
    """GPT-2 with the native model's total layers (the top-query layer counted), width, heads, FFN and vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=cfg.total_layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
                                      n_inner=cfg.ffn_hidden_size, vocab_size=cfg.vocab_size,
                                      n_positions=cfg.max_position_embeddings, resid_pdrop=0, embd_pdrop=0,
                                      attn_pdrop=0, bos_token_id=0, eos_token_id=0)).eval()


def run_native(model: Any, batch: list[list[int]], new: int, greedy: bool) -> float:
    from megatron_code.generation import SamplingConfig, generate

    start = time.perf_counter()
    outs = generate(model, batch, SamplingConfig(max_new_tokens=new, greedy=greedy, temperature=0.8, top_p=0.95),
                    pad_id=1)
    seconds = time.perf_counter() - start
    assert all(len(o) == new for o in outs)
    return seconds


def run_hf(model: Any, batch: list[list[int]], new: int, greedy: bool) -> float:
    from transformers import GenerationConfig

    longest = max(len(p) for p in batch)
    ids = torch.tensor([[1] * (longest - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
    gen = GenerationConfig(do_sample=not greedy, temperature=None if greedy else 0.8, top_p=None if greedy else 0.95,
                           top_k=None if greedy else 0, max_new_tokens=new, min_new_tokens=new, pad_token_id=1,
                           eos_token_id=None)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    seconds = time.perf_counter() - start
    assert out.shape[1] == longest + new
    return seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    torch.set_num_threads(args.threads)
    native = native_model(args.preset)
    hf = gpt2_like(native.cfg)
    batch = prompts(args.batch, native.cfg.vocab_size, 0, (args.min_prompt, args.max_prompt), args.same_prompt)
    tokens = args.batch * args.new_tokens
    times: dict[str, list[float]] = {"native": [], "hf": []}
    run_native(native, batch[:2], 4, args.greedy)  # warm-up: allocator, kernels
    run_hf(hf, batch[:2], 4, args.greedy)
    for _ in range(args.repeats):  # alternating, so both see the same machine
        times["native"].append(run_native(native, batch, args.new_tokens, args.greedy))
        times["hf"].append(run_hf(hf, batch, args.new_tokens, args.greedy))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": args.preset, "batch": args.batch, "new_tokens": args.new_tokens, "greedy": args.greedy,
            "same_prompt": args.same_prompt,
            "prompt_tokens": sum(len(p) for p in batch), "threads": args.threads, "repeats": args.repeats,
            "native_params": sum(p.numel() for p in native.parameters()),
            "hf_params": sum(p.numel() for p in hf.parameters()), "transformers": transformers.__version__,
            "torch": torch.__version__, "seconds": times,
            "tokens_per_s": {k: tokens / v for k, v in med.items()}, "speedup": med["hf"] / med["native"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pangu-coder-100m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=120)
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--same-prompt", action="store_true", help="one prompt, --batch samples of it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)
    result = measure(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), result)
    t = result["tokens_per_s"]
    sys.stdout.write(f"{args.preset} batch {args.batch} x {args.new_tokens} new tokens "
                     f"({'greedy' if args.greedy else 'sampled'}{', one prompt' if args.same_prompt else ''}): native {t['native']:.1f} tok/s, HF generate "
                     f"{t['hf']:.1f} tok/s, {result['speedup']:.2f}x\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
