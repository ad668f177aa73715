"""Model step benchmark: forward + backward of `CodeGeeXModel` (TP=1) against a plain PyTorch model of the same math.

The reference below is written for this benchmark only: nn.Linear layers, fp32 LayerNorm, FastGELU, the same
per-document mask given to scaled_dot_product_attention, the top-query layer and the tied output, with the plain
F.cross_entropy loss. Both models get the same weights; the script checks their losses agree, then times steps
alternately and reports the medians and the ratio (target: ours at most 1.15x the reference's step time).

On a GPU (the device machine) it also times four 13B-shaped layers in bf16 at sequence 2048 and reports MFU.

Usage: python benchmarks/model_step.py [--presets tiny 350m] [--seq-len 256] [--batch 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file where the project is not installed

from common.devices import DEVICES, peak_tflops_for_cuda_name  # noqa: E402
from megatron_code.attention import MaskInfo  # noqa: E402
from megatron_code.config import ModelConfig, load_preset  # noqa: E402
from megatron_code.flops import flops_per_token  # noqa: E402
from megatron_code.model import CodeGeeXModel  # noqa: E402
from megatron_code.objectives import vocab_parallel_cross_entropy  # noqa: E402
from megatron_code.parallel import single_context  # noqa: E402


class RefLayer(nn.Module):
    def __init__(self, c: int, f: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(c, f), nn.Linear(f, c)
        self.heads = heads

    def forward(self, x: Tensor, mask: Tensor, query: Tensor | None = None) -> Tensor:
        b, t, c = x.shape
        ln = lambda m, y: F.layer_norm(y.float(), (c,), m.weight.float(), m.bias.float(), 1e-5).to(y.dtype)  # noqa: E731
        h = ln(self.ln1, x)
        split = lambda y: y.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.q(h if query is None else query))
        a = F.scaled_dot_product_attention(q, split(self.k(h)), split(self.v(h)), attn_mask=mask,
                                           scale=1 / math.sqrt(c // self.heads))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, c))
        m = self.fc1(ln(self.ln2, x))
        return x + self.fc2(m * torch.sigmoid(1.702 * m))


class RefModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.wte = nn.Embedding(cfg.vocab_size, c)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, c)
        self.tqe = nn.Embedding(cfg.max_position_embeddings, c)
        self.layers = nn.ModuleList(RefLayer(c, cfg.ffn_hidden_size, cfg.num_attention_heads) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(c)
        self.top = RefLayer(c, cfg.ffn_hidden_size, cfg.num_attention_heads)

    def forward(self, tokens: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(pos)
        for layer in self.layers:
            x = layer(x, mask)
        x = F.layer_norm(x.float(), (x.shape[-1],), self.ln_f.weight, self.ln_f.bias, 1e-5).to(x.dtype)
        x = self.top(x, mask, self.tqe(pos))
        return x @ self.wte.weight.t()


def copy_weights(ours: CodeGeeXModel, ref: RefModel) -> None:
    p = dict(ours.named_parameters())
    names = {"wte.weight": "word_embeddings.weight", "wpe.weight": "position_embeddings.weight",
             "tqe.weight": "top_query_embeddings.weight", "ln_f.weight": "final_layernorm.weight",
             "ln_f.bias": "final_layernorm.bias"}
    sub = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "q": "attention.query", "k": "attention.key",
           "v": "attention.value", "o": "attention.dense", "fc1": "mlp.dense_h_to_4h", "fc2": "mlp.dense_4h_to_h"}
    for i in range(len(ref.layers)):
        for short, long in sub.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{short}.{kind}"] = f"layers.{i}.{long}.{kind}"
                names[f"top.{short}.{kind}"] = f"top_query_layer.{long}.{kind}"
    with torch.no_grad():
        for name, param in ref.named_parameters():
            param.copy_(p[names[name]])


def time_steps(step, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def compare(name: str, cfg: ModelConfig, batch: int, seq: int, steps: int) -> None:
    pc = single_context()
    torch.manual_seed(0)
    ours = CodeGeeXModel(cfg, pc)
    ref = RefModel(cfg)
    copy_weights(ours, ref)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    pos = torch.arange(seq).repeat(batch, 1)
    info = MaskInfo(torch.zeros(batch, seq, dtype=torch.long))
    mask = info.additive(seq, torch.float32)

    def ours_step() -> float:
        ours.zero_grad(set_to_none=True)
        logits, _ = ours(tokens[:, :-1], pos, MaskInfo(info.segment_ids))
        loss = vocab_parallel_cross_entropy(logits, tokens[:, 1:], pc).mean()
        loss.backward()
        return float(loss)

    def ref_step() -> float:
        ref.zero_grad(set_to_none=True)
        logits = ref(tokens[:, :-1], pos, mask)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        return float(loss)

    a, b = ours_step(), ref_step()
    assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (a, b)
    ours_t, ref_t = [], []
    for _ in range(steps):  # alternate, so drifts hit both
        ours_t += time_steps(ours_step, 1)
        ref_t += time_steps(ref_step, 1)
    mo, mr = statistics.median(ours_t), statistics.median(ref_t)
    toks = batch * seq
    print(f"| {name} | {batch}x{seq} | {toks / mo:,.0f} | {toks / mr:,.0f} | {mo * 1e3:.1f} | {mr * 1e3:.1f} | "
          f"{mo / mr:.3f} |")


def gpu_layers(steps: int) -> None:
    cfg = load_preset("codegeex-13b", ["num_layers=4", "top_query_layer=false", "hidden_dropout=0",
                                       "attention_dropout=0", "params_dtype=bfloat16"])
    pc = single_context()
    torch.manual_seed(0)
    model = CodeGeeXModel(cfg, pc).cuda()
    seq, batch = 2048, 4
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    pos = torch.arange(seq, device="cuda").repeat(batch, 1)
    mask = MaskInfo.from_documents(np.zeros((batch, seq), dtype=np.int64), "cuda")  # flash's metadata too

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens[:, :-1], pos, mask)
        vocab_parallel_cross_entropy(logits, tokens[:, 1:], pc).mean().backward()
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = time_steps(step, steps)
    med = statistics.median(times)
    flops = flops_per_token(cfg, seq) * batch * seq
    name = torch.cuda.get_device_name()
    peak = (peak_tflops_for_cuda_name(name) or DEVICES["H100-80"].peak_tflops) * 1e12  # an unknown GPU: as H100
    print(f"4 layers of 13B shape, bf16, batch {batch} x {seq}: {med * 1e3:.1f} ms/step, "
          f"{flops / med / 1e12:.1f} TFLOP/s, MFU {flops / med / peak:.1%} ({torch.cuda.get_device_name()})")


def step_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options both step benchmarks take."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "350m"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    return ap


def main() -> None:
    args = step_arguments(__doc__).parse_args()
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| preset | batch x seq | ours tokens/s | reference tokens/s | ours ms/step | reference ms/step | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.presets:
        cfg = load_preset(name, ["hidden_dropout=0", "attention_dropout=0", "params_dtype=float32"])
        compare(name, cfg, args.batch, args.seq_len, args.steps)
    if torch.cuda.is_available():
        gpu_layers(args.steps)


if __name__ == "__main__":
    main()
