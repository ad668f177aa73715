"""13B-shaped generation on one GPU: native (``megatron_code.generation.generate``, bf16, preallocated KV cache)
against vLLM's offline engine on the same GPU, batch 32, the same random prompt token ids, the same number of new
tokens. Both models have random weights (vLLM's ``load_format="dummy"`` on a GPT-2-shaped config with CodeGeeX's
layers, width, heads, FFN and vocabulary); speed does not depend on them. Native runs first and frees the GPU.

    python -m benchmarks.gpu_generation --batch 32 --new-tokens 128 --json runs/gpu_generation.json

Needs a CUDA GPU with about 90 GB free (weights 26 GB, KV cache for batch 32 x 2048 positions); vLLM is optional
(its figure is left out, saying so, when it is not installed). Not run yet: no GPU has been lent to this project.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.generation_speed import prompts


def native(args: argparse.Namespace, batch: list[list[int]]) -> dict[str, Any]:
    from megatron_code.config import load_preset
    from megatron_code.generation import SamplingConfig, generate
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    cfg = load_preset(args.preset, ["params_dtype=bfloat16", "hidden_dropout=0", "attention_dropout=0"])
    torch.manual_seed(0)
    model = CodeGeeXModel(cfg, single_context()).eval()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, greedy=args.greedy, temperature=0.8, top_p=0.95)
    generate(model, batch[:2], SamplingConfig(max_new_tokens=4, greedy=True), pad_id=1)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = generate(model, batch, sampling, pad_id=1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outs)
    del model
    torch.cuda.empty_cache()
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def vllm_run(args: argparse.Namespace, batch: list[list[int]]) -> dict[str, Any]:
    try:
        import vllm
    except ImportError:
        return {"skipped": "vllm is not installed"}
    from megatron_code.config import load_preset

    cfg = load_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": cfg.total_layers,
                  "n_embd": cfg.hidden_size, "n_head": cfg.num_attention_heads, "n_inner": cfg.ffn_hidden_size,
                  "vocab_size": cfg.vocab_size, "n_positions": cfg.max_position_embeddings,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 0,
                  "eos_token_id": 0, "torch_dtype": "bfloat16"}
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        llm = vllm.LLM(model=tmp, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                       gpu_memory_utilization=0.85, max_model_len=cfg.max_position_embeddings)
        params = vllm.SamplingParams(temperature=0.0 if args.greedy else 0.8, top_p=1.0 if args.greedy else 0.95,
                                     max_tokens=args.new_tokens, min_tokens=args.new_tokens, ignore_eos=True,
                                     detokenize=False)
        requests = [{"prompt_token_ids": p} for p in batch]
        llm.generate(requests[:2], params, use_tqdm=False)  # warm-up (CUDA graphs are captured at start-up)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "vllm": vllm.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="codegeex-13b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("gpu_generation: no CUDA GPU here\n")
        return 2
    batch = prompts(args.batch, 52224, 0, (150, 300))
    result = {"preset": args.preset, "batch": args.batch, "new_tokens": args.new_tokens, "greedy": args.greedy,
              "device": torch.cuda.get_device_name(), "native": native(args, batch), "vllm": vllm_run(args, batch)}
    if "tokens_per_s" in result["vllm"]:
        result["ratio_native_over_vllm"] = result["native"]["tokens_per_s"] / result["vllm"]["tokens_per_s"]
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
