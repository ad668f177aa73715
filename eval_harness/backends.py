"""Where ``codegeex eval generate`` gets its tokens: a native checkpoint (``native``: tensor x data parallel under
torchrun, on the local GPU in bf16 or on the CPU), any Hugging Face causal LM directory (``hf``: transformers'
``generate()``), or vLLM (``vllm``: GPU only). Every backend sees the same tasks, prompts (:class:`Prompter`), stop
rules (:mod:`eval_harness.stops`) and sampling settings; the driver (:mod:`eval_harness.generate`) slices the work
over data-parallel ranks and writes the samples file.

Sampling seeds: native draws every sample from its own stream, seeded by (``--seed``, task key, sample number), so
a sample is the same whatever batch, rank or world size generates it. ``hf`` and ``vllm`` sample with their own
generators: ``hf`` seeds torch once per batch (the same batches give the same samples), ``vllm`` seeds each request
with the sample's seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from common.config import ConfigError
from eval_harness.gen_config import GenerateConfig, prompt_format
from eval_harness.stops import PYTHON_STOPS, truncate
from eval_harness.tasks import Task

if TYPE_CHECKING:
    from eval_harness.pair_prompts import Prompter

log = logging.getLogger("codegeex.eval")


@dataclass(frozen=True)
class Shard:
    """This process's part of the work: its data-parallel slice, and whether it writes the rows of its slice (one
    process per data-parallel rank writes: tensor-parallel rank 0)."""

    dp_rank: int = 0
    dp_size: int = 1
    writer: bool = True
    world_size: int = 1  # every process of the job (they agree on stops between batches)


class Generator(Protocol):
    """A backend, loaded: what the driver asks of each."""

    name: str
    shard: Shard
    prompter: Prompter
    source: str  # the checkpoint or model directory, written into every sample
    step: int | None  # the checkpoint's training step (None: not a native checkpoint)

    def complete(self, batch: list[Task], seeds: list[int], interrupt: Callable[[], None] | None) -> list[str]:
        """The completion of every task of ``batch``, cut by its stop rule (``seeds``: one per sample)."""
        ...


def local_device() -> Any:
    """This process's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class NativeGenerator:
    """A native checkpoint under a (TP x DP) parallel context: tensor-parallel groups hold the model, data-parallel
    ranks take disjoint slices of the prompts."""

    name = "native"

    def __init__(self, cfg: GenerateConfig, checkpoint: str | Path, problems: dict[str, Any]) -> None:
        from data_pipeline.tokenizer import check_vocab_fits, load_tokenizer
        from eval_harness.pair_prompts import Prompter
        from megatron_code.checkpoint import load_model, read_manifest, resolve_model_dir
        from megatron_code.parallel import build_parallel_context, single_context

        ckpt = resolve_model_dir(checkpoint)
        manifest = read_manifest(ckpt)
        self.tok = load_tokenizer(manifest.tokenizer_path(cfg.tokenizer, ckpt))
        fmt, self.prefix_lm = prompt_format(cfg, manifest)
        self.prompter = Prompter(self.tok, problems, fmt)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.tp > world:
            raise ConfigError(f"--tp ({cfg.tp}) needs that many ranks; this job has {world}: start it with "
                              f"`codegeex launch local --nproc {cfg.tp} -- eval generate ...` or torchrun")
        self.pc = build_parallel_context(cfg.tp) if world > 1 else single_context()
        self.model = load_model(ckpt, self.pc, dtype=cfg.dtype)
        check_vocab_fits(self.tok, self.model.cfg.vocab_size)
        self.shard = Shard(self.pc.dp_rank, self.pc.dp_size, self.pc.tp_rank == 0, world)
        self.source, self.cfg = str(ckpt), cfg
        self.step: int | None = manifest.step
        log.info("native generation: TP=%d x DP=%d on %s in %s", self.pc.tp_size, self.pc.dp_size,
                 self.pc.device, next(self.model.parameters()).dtype)

    def complete(self, batch: list[Task], seeds: list[int], interrupt: Callable[[], None] | None) -> list[str]:
        from megatron_code.generation import SamplingConfig, generate

        cfg = self.cfg
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy, temperature=cfg.temperature,
                                  top_p=cfg.top_p, seed=cfg.seed)
        encoded = [self.prompter.encode(t) for t in batch]

        def stop(i: int, new: list[int]) -> bool:
            return self.prompter.completion(batch[i], new, encoded[i][2])[1]

        outs = generate(self.model, [e[0] for e in encoded], sampling, pad_id=self.tok.pad_id, eod_id=self.tok.eod_id,
                        stop=stop, vocab_limit=self.tok.vocab_size, modality=[e[1] for e in encoded],
                        prefix_lm=self.prefix_lm, interrupt=interrupt, seeds=seeds)
        return [self.prompter.completion(t, out, e[2])[0] for t, out, e in zip(batch, outs, encoded, strict=True)]


class TextTokenizer:
    """A Hugging Face tokenizer as :class:`Prompter` uses a tokenizer (``encode``, ``decode``), and the completion
    of a task from the tokens generated after its prompt."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self._heads: dict[tuple[int, ...], str] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def decode_after(self, prompt: list[int], new: list[int]) -> str:
        """The text ``new`` adds after ``prompt``: both decoded together, the prompt's own decoding cut off
        (SentencePiece tokenizers, Llama's among them, drop a leading space when a sequence is decoded alone, which
        would take one space off the first line's indentation; bigcode-evaluation-harness cuts the same way)."""
        key = tuple(prompt)
        if key not in self._heads:
            if len(self._heads) > 256:  # a batch's prompts, not every prompt of the run
                self._heads.clear()
            self._heads[key] = self.decode(prompt)
        head, full = self._heads[key], self.decode(prompt + new)
        return full[len(head):] if full.startswith(head) else self.decode(new)

    def cut(self, task: Task, prompt: list[int], new: list[int]) -> tuple[str, bool]:
        """(the completion so far, cut by the task's stop rule; whether it has ended)."""
        return truncate(task.language, task.prompt, self.decode_after(prompt, new))


def _model_dir(cfg: GenerateConfig) -> Path:
    if not cfg.model:
        raise ConfigError(f"--backend {cfg.backend} needs --model DIR (a Hugging Face model directory)")
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {path}: no config.json there (a directory written by save_pretrained)")
    return path


def _data_parallel_shard() -> Shard:
    """hf under torchrun: every rank a data-parallel rank with its own copy of the model."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from megatron_code.parallel import ensure_process_group

        ensure_process_group()  # for the stop agreement between batches
    rank = int(os.environ.get("RANK", "0"))
    return Shard(rank, world, True, world)


class HFGenerator:
    """Any causal LM directory, through transformers' ``generate()`` with the same sampling settings (nothing taken
    from the model's own generation config) and the stop rules as a stopping criterion."""

    name = "hf"

    def __init__(self, cfg: GenerateConfig, problems: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from eval_harness.pair_prompts import Prompter

        path = _model_dir(cfg)
        self.shard = _data_parallel_shard()
        self.device = local_device()
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tok.padding_side = "left"
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        if self.pad_id is None:
            raise ConfigError(f"--model {path}: its tokenizer has neither a pad nor an eos token")
        from transformers import GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(self.device)
        self.model.eval()
        self.model.generation_config = GenerationConfig()  # nothing of the directory's own generation_config.json
        self.text = TextTokenizer(self.tok)
        self.prompter = Prompter(self.text, problems, None)  # type: ignore[arg-type]
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.source, self.cfg = str(path), cfg
        self.step: int | None = None

    def complete(self, batch: list[Task], seeds: list[int], interrupt: Callable[[], None] | None) -> list[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        cfg, text = self.cfg, self.text
        encoded = [self.prompter.encode(t)[0] for t in batch]
        longest = max(len(e) for e in encoded)
        new_tokens = cfg.max_new_tokens if not self.context else min(cfg.max_new_tokens, self.context - longest)
        if new_tokens <= 0:
            log.warning("%s: prompts of %d tokens leave no room in the model's %s positions", batch[0].task_id,
                        longest, self.context)
            return [""] * len(batch)
        ids = torch.tensor([[self.pad_id] * (longest - len(e)) + e for e in encoded], device=self.device)
        attention = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded], device=self.device)

        class StopRules(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                if interrupt is not None:
                    interrupt()
                new = input_ids[:, longest:].tolist()
                ended = [text.cut(t, e, row)[1] for t, e, row in zip(batch, encoded, new, strict=True)]
                return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)

        gen = GenerationConfig(do_sample=not cfg.greedy, temperature=None if cfg.greedy else cfg.temperature,
                               top_p=None if cfg.greedy else cfg.top_p, top_k=None if cfg.greedy else 0,
                               max_new_tokens=new_tokens, pad_token_id=self.pad_id, repetition_penalty=1.0,
                               num_beams=1, eos_token_id=self.tok.eos_token_id)
        torch.manual_seed(seeds[0] % 2**63)  # per batch: the same batches give the same samples
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=attention, generation_config=gen,
                                      stopping_criteria=StoppingCriteriaList([StopRules()]))
        rows = [[t for t in row if t != self.pad_id] for row in out[:, longest:].tolist()]
        return [text.cut(t, e, row)[0] for t, e, row in zip(batch, encoded, rows, strict=True)]


class VLLMGenerator:
    """vLLM's offline engine on this machine's GPUs (its own tensor parallelism, ``--tp``): one process."""

    name = "vllm"

    def __init__(self, cfg: GenerateConfig, problems: dict[str, Any]) -> None:
        import torch

        from eval_harness.pair_prompts import Prompter

        path = _model_dir(cfg)
        if not torch.cuda.is_available():
            raise ConfigError("--backend vllm runs on GPUs and this machine has none; use --backend hf or native")
        try:
            import vllm
        except ImportError as exc:
            raise ConfigError("--backend vllm needs the vllm package, which is not installed in this environment "
                              "(pip install vllm, on a GPU machine)") from exc
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--backend vllm runs as one process (it spreads over GPUs itself with --tp); start it "
                              "without torchrun")
        dtype = "auto" if cfg.dtype == "auto" else cfg.dtype
        self.llm = vllm.LLM(model=str(path), tensor_parallel_size=cfg.tp, seed=cfg.seed, dtype=dtype)
        self.vllm = vllm
        self.text = TextTokenizer(self.llm.get_tokenizer())
        self.prompter = Prompter(self.text, problems, None)  # type: ignore[arg-type]
        self.shard, self.source, self.cfg = Shard(), str(path), cfg
        self.step: int | None = None

    def complete(self, batch: list[Task], seeds: list[int], interrupt: Callable[[], None] | None) -> list[str]:
        cfg = self.cfg
        if interrupt is not None:
            interrupt()
        params = [self.vllm.SamplingParams(
            n=1, temperature=0.0 if cfg.greedy else cfg.temperature, top_p=1.0 if cfg.greedy else cfg.top_p,
            max_tokens=cfg.max_new_tokens, seed=seed % 2**63,
            stop=list(PYTHON_STOPS) if t.language == "python" else None) for t, seed in zip(batch, seeds, strict=True)]
        encoded = [self.prompter.encode(t)[0] for t in batch]
        outs = self.llm.generate([{"prompt_token_ids": e} for e in encoded], params, use_tqdm=False)
        return [self.text.cut(t, e, list(o.outputs[0].token_ids))[0]
                for t, e, o in zip(batch, encoded, outs, strict=True)]


def load_generator(cfg: GenerateConfig, checkpoint: str | Path | None, problems: dict[str, Any]) -> Generator:
    """The backend ``cfg.backend`` names, loaded (native: from ``checkpoint``; hf and vllm: from ``cfg.model``)."""
    if cfg.backend == "native":
        if not checkpoint:
            raise ConfigError("--backend native needs --checkpoint (a model, step-N, checkpoints or run directory)")
        return NativeGenerator(cfg, checkpoint, problems)
    if cfg.backend == "hf":
        return HFGenerator(cfg, problems)
    if cfg.backend == "vllm":
        return VLLMGenerator(cfg, problems)
    raise ConfigError(f"--backend {cfg.backend!r} must be one of native, hf, vllm")
