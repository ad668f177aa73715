"""Training step benchmark: `codegeex train` (TP=1, DP=1, ZeRO-1) against a plain PyTorch training loop.

The reference is `benchmarks/model_step.py`'s plain model with torch.optim.AdamW (same betas, eps, weight decay
groups), gradient clipping at 1.0 and the same batches from the same synthetic store. Ours is the real trainer
(DeepSpeed engine, sampler, token-weighted loss, metrics). Step times exclude the first two steps; medians.
Target: ours at most 1.15x the reference's step time.

On a GPU it also reports the trainer's MFU for the 350m preset and a 4-layer slice of the 13B shape (bf16, seq 2048).

Usage: python benchmarks/train_step.py [--presets tiny 350m] [--seq-len 256] [--batch 2] [--steps 8]
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.model_step import RefModel, copy_weights, step_arguments
from common.config import load_config
from data_pipeline.sampler import DataSampler, SamplerConfig
from megatron_code.config import load_preset
from megatron_code.deepspeed_glue import lr_lambda
from megatron_code.model import CodeGeeXModel
from megatron_code.objectives import prepare_batch
from megatron_code.parallel import single_context
from megatron_code.train_config import TrainConfig
from megatron_code.training import train
from tests.model_utils import synthetic_store


def config(preset: str, store: str, run_dir: str, seq: int, batch: int, steps: int, dtype: str = "fp32") -> TrainConfig:
    model = load_preset(preset, ["hidden_dropout=0", "attention_dropout=0"])
    values = {"run_dir": run_dir, "model": {k: getattr(model, k) for k in model.__dataclass_fields__},
              "micro_batch_size": batch, "train_steps": steps, "zero_stage": 1,
              "data": {"sources": [{"path": store}], "global_batch_size": batch},
              "optim": {"lr": 1e-4, "warmup_steps": 2}, "precision": {"dtype": dtype},
              "checkpoint": {"interval": 10**9, "keep": 1, "resume": "none"}, "log": {"interval": 1, "tensorboard": False}}
    values["model"]["params_dtype"] = "float32"
    values["model"]["max_position_embeddings"] = max(values["model"]["max_position_embeddings"], seq)
    return load_config(TrainConfig, values=values)


def ours(cfg: TrainConfig) -> list[float]:
    cfg = copy.deepcopy(cfg)
    (Path(cfg.run_dir) / "metrics.jsonl").unlink(missing_ok=True)
    train(cfg, ["benchmark"])
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows][2:]


def reference(cfg: TrainConfig) -> list[float]:
    pc = single_context()
    torch.manual_seed(cfg.seed)
    model = RefModel(cfg.model)
    copy_weights(CodeGeeXModel(cfg.model, pc), model)
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or ".ln" in n or n.startswith("ln"))]
    rest = [p for n, p in model.named_parameters() if n.endswith(".bias") or ".ln" in n or n.startswith("ln")]
    o = cfg.optim
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = DataSampler(SamplerConfig(sources=cfg.data.sources, global_batch_size=cfg.data.global_batch_size))
    times = []
    for _ in range(cfg.train_steps):
        t0 = time.perf_counter()
        inp = prepare_batch(sampler.next_batch())
        mask = inp.mask.additive(inp.tokens.shape[1], torch.float32)
        logits = model(inp.tokens, inp.position_ids, mask)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inp.labels.reshape(-1), reduction="none")
        loss = (losses * inp.loss_mask.reshape(-1)).sum() / inp.loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
    return times[2:]


def main() -> None:
    ap = step_arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| preset | batch x seq | ours tokens/s | reference tokens/s | ours ms/step | reference ms/step | ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "store", windows=4 * args.batch * args.steps, seq_len=args.seq_len,
                                vocab=8192)
        for name in args.presets:
            cfg = config(name, store, str(Path(tmp) / name), args.seq_len, args.batch, args.steps)
            ours_t, ref_t = [], []
            for _ in range(args.repeats):  # alternate whole runs so drifts in machine speed hit both
                ours_t += ours(cfg)
                ref_t += reference(cfg)
            mo, mr = statistics.median(ours_t), statistics.median(ref_t)
            toks = args.batch * args.seq_len
            print(f"| {name} | {args.batch}x{args.seq_len} | {toks / mo:,.0f} | {toks / mr:,.0f} | {mo * 1e3:.1f} | "
                  f"{mr * 1e3:.1f} | {mo / mr:.3f} |")
        if torch.cuda.is_available():
            for name, over in (("350m", []), ("codegeex-13b", ["num_layers=4"])):
                cfg = config(name, store, str(Path(tmp) / f"gpu-{name}"), 2048, 4, args.steps, "bf16")
                cfg.model.params_dtype = "bfloat16"
                for o in over:
                    k, v = o.split("=")
                    setattr(cfg.model, k, int(v))
                train(cfg, ["benchmark"])
                rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
                print(f"GPU {name}: MFU {statistics.median(r.get('mfu', 0) for r in rows[2:]):.1%}")


if __name__ == "__main__":
    main()
