"""`codegeex eval generate` backends: native generation under TP=2 x DP=2 (4 gloo ranks, started by `codegeex
launch local`) equals one process for greedy decoding and for seeded sampling; a Hugging Face causal LM directory
(a tiny random GPT-2 with a BPE tokenizer, both saved here) generates resumable samples with the same stop rules;
vLLM says what it needs where it cannot run."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_harness.samples import read_samples
from eval_harness.stops import truncate
from launch.cli import main
from tests.conftest import shared_path
from tests.test_eval_generate import save_tiny

REPO = Path(__file__).resolve().parents[1]


def tiny_gpt2(path: Path) -> Path:
    """A random 2-layer GPT-2 and a byte-level BPE tokenizer trained on HumanEval prompts, as save_pretrained
    writes them (no download)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    with gzip.open(shared_path("humaneval-x", "python", "humaneval_python.jsonl.gz"), "rt") as fh:
        texts = [json.loads(line)["prompt"] for line in fh]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=2048,
                                       bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def by_sample(path: Path) -> dict[tuple[str, int], str]:
    rows = read_samples(path)
    assert len({(r["key"], r["sample"]) for r in rows}) == len(rows), "a sample written twice"
    return {(r["key"], r["sample"]): r["completion"] for r in rows}


@pytest.mark.slow
def test_tp2_dp2_generation_equals_one_process_greedy_and_seeded(tmp_path, tokenizer_model):
    data = str(shared_path("humaneval-x"))
    save_tiny(tmp_path / "ckpt", tokenizer_model, 3, 0)
    common = ["eval", "generate", "--checkpoint", str(tmp_path / "ckpt"), "--data", data, "--languages",
              "python,cpp,go", "--problems", "3", "--max-new-tokens", "12"]
    runs = {"greedy": ["--greedy", "--n", "2", "--batch-size", "4"],
            "sampled": ["--temperature", "1.2", "--top-p", "0.9", "--n", "3", "--batch-size", "5"]}
    for name, extra in runs.items():  # one process, batches of another size than the ranks'
        assert main([*common, *extra[:-1], "6", "--output", str(tmp_path / f"{name}-1.jsonl")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name, extra in runs.items():
        out = tmp_path / f"{name}-4.jsonl"
        cmd = [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", "4", "--", *common, *extra,
               "--tp", "2", "--output", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        single, spread = by_sample(tmp_path / f"{name}-1.jsonl"), by_sample(out)
        assert len(spread) == len(single) == 9 * int(extra[extra.index("--n") + 1])
        assert spread == single, [k for k in single if spread.get(k) != single[k]][:5]
        assert {r["backend"] for r in read_samples(out)} == {"native"}
    sampled = by_sample(tmp_path / "sampled-1.jsonl")
    assert len({sampled[("Python/0|generation", j)] for j in range(3)}) > 1  # seeds differ between samples
    records = list((tmp_path / "launch").glob("*.json"))
    assert records, "the launch was not recorded beside the output"


@pytest.mark.slow
def test_hf_backend_samples_resume_and_obey_the_stop_rules(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_gpt2(tmp_path / "gpt2")
    data = str(shared_path("humaneval-x"))
    out = tmp_path / "samples.jsonl"
    args = ["eval", "generate", "--backend", "hf", "--model", str(model_dir), "--data", data, "--languages",
            "python,js", "--problems", "2", "--max-new-tokens", "24", "--batch-size", "3", "--output", str(out)]
    assert main([*args, "--greedy", "--n", "2"]) == 0
    rows = read_samples(out)
    assert len(rows) == 8 and {r["backend"] for r in rows} == {"hf"} and {r["checkpoint"] for r in rows} == {str(model_dir)}
    from eval_harness.gen_config import GenerateConfig
    from eval_harness.generate import make_tasks

    tasks, _ = make_tasks(GenerateConfig(data=data, languages="python,js", problems=2))
    prompts = {t.task_id: t.prompt for t in tasks}  # the prompts as every backend sees them (language tag first)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for r in rows:  # each equals transformers' own greedy decoding of the prompt alone, cut by the same rule
        ids = torch.tensor([tok(prompts[r["task_id"]])["input_ids"]])
        ref = model.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        expected = truncate(r["language"], prompts[r["task_id"]], tok.decode(ref, skip_special_tokens=True))[0]
        assert r["completion"] == expected or expected.startswith(r["completion"]), (r["task_id"], r["sample"], r["completion"], expected)
    before = out.read_text()
    assert main([*args, "--greedy", "--n", "2"]) == 0 and out.read_text() == before  # nothing missing
    assert main([*args, "--n", "3", "--temperature", "0.9"]) == 0
    assert sorted(r["sample"] for r in read_samples(out) if r["task_id"] == "Python/0") == [0, 1, 2]
    results = tmp_path / "results.jsonl"
    assert main(["eval", "execute", str(out), "--data", data, "--output", str(results)]) == 0


def test_backend_errors_name_what_is_needed(tmp_path, caplog):
    data = str(shared_path("humaneval-x"))
    base = ["eval", "generate", "--data", data, "--problems", "1", "--languages", "python",
            "--output", str(tmp_path / "s.jsonl")]
    caplog.set_level(logging.ERROR)
    assert main([*base, "--backend", "hf"]) == 2
    assert main([*base, "--backend", "hf", "--model", str(tmp_path)]) == 2
    assert main([*base]) == 2  # native without --checkpoint
    (tmp_path / "config.json").write_text("{}")
    assert main([*base, "--backend", "vllm", "--model", str(tmp_path)]) == 2
    text = caplog.text
    assert "--backend hf needs --model DIR" in text and "no config.json there" in text
    assert "--backend native needs --checkpoint" in text
    assert "vllm" in text and ("has none" in text or "not installed" in text)
    assert not (tmp_path / "s.jsonl").exists()


class LeadingSpaceTokenizer:
    """Decodes as SentencePiece tokenizers (Llama's) do: a sequence's first piece loses its leading space."""

    pieces = ["def", " f():", "\n", "   ", " return", " 1", "\n"]

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids, rest = [], text
        while rest:
            i = max((k for k, p in enumerate(self.pieces) if rest.startswith(p)), key=lambda k: len(self.pieces[k]))
            ids.append(i)
            rest = rest[len(self.pieces[i]):]
        return {"input_ids": ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids).removeprefix(" ")


def test_hf_completions_keep_the_first_lines_indentation():
    from eval_harness.backends import TextTokenizer

    text = TextTokenizer(LeadingSpaceTokenizer())
    prompt, new = text.encode("def f():\n"), text.encode("    return 1\n")
    assert text.decode(new) == "   return 1\n"  # alone: one space short, an IndentationError in Python
    assert text.decode_after(prompt, new) == "    return 1\n"


def test_slurm_runs_eval_generate_on_every_rank_through_an_argument_file(tmp_path, capsys):
    out = tmp_path / "gen" / "s.jsonl"
    argv = ["launch", "slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--", "eval", "generate",
            "--checkpoint", "RUN", "--tp", "2", "--n", "20", f"--output={out}"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert "--nnodes 2 --nproc-per-node 8" in script and "-m launch.cli @" in script
    files = list((tmp_path / "gen" / "launch").glob("command-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == argv[8:]
    assert main(["launch", "slurm", "--dry-run", "--", "eval", "execute", "x", "--output", "y"]) == 2
