"""`codegeex eval generate` from a checkpoint (stop rules, resumption, every field the executor needs) and
`codegeex eval watch` over a run's checkpoints (each once, restartable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_harness.samples import read_results, read_samples
from launch.cli import main
from tests.conftest import shared_path
from tests.model_utils import tiny_config


def save_tiny(path: Path, tokenizer: str, step: int, seed: int) -> None:
    import torch

    from common.contracts import TokenizerRecord
    from data_pipeline.tokenizer import CodeTokenizer
    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    tok = CodeTokenizer(tokenizer)
    torch.manual_seed(seed)
    model = CodeGeeXModel(tiny_config(vocab_size=1280, max_position_embeddings=4096), single_context())
    save_checkpoint(path, model, step, TokenizerRecord(path=tokenizer, vocab_size=tok.vocab_size))


GEN = ["--languages", "python,js", "--problems", "2", "--max-new-tokens", "6", "--batch-size", "4"]


@pytest.mark.slow
def test_generate_resumes_and_feeds_the_executor(tmp_path, tokenizer_model):
    data = str(shared_path("humaneval-x"))
    save_tiny(tmp_path / "ckpt", tokenizer_model, 7, 0)
    out = tmp_path / "samples.jsonl"
    args = ["eval", "generate", "--checkpoint", str(tmp_path / "ckpt"), "--data", data, *GEN, "--output", str(out)]
    assert main([*args, "--n", "2"]) == 0
    rows = read_samples(out)
    assert len(rows) == 8 and {r["sample_index"] for r in rows} == {0, 1}
    assert {r["kind"] for r in rows} == {"generation"} and all(r["checkpoint_step"] == 7 for r in rows)
    before = out.read_text()
    assert main([*args, "--n", "2"]) == 0 and out.read_text() == before  # nothing missing, nothing added
    assert main([*args, "--n", "3"]) == 0 and len(read_samples(out)) == 12  # only the third sample of each task
    assert main(["eval", "execute", str(out), "--data", data, "--output", str(tmp_path / "r.jsonl")]) == 0
    results = read_results(tmp_path / "r.jsonl")
    assert len(results) == 12 and all(r["status"] in ("failed", "compile_error", "runtime_error", "timeout")
                                      for r in results)  # random weights solve nothing
    assert main(["eval", "generate", "--checkpoint", str(tmp_path / "ckpt"), "--data", data, "--task", "translation",
                 "--languages", "python,js", "--problems", "1", "--max-new-tokens", "4", "--greedy",
                 "--output", str(tmp_path / "t.jsonl")]) == 0
    trans = read_samples(tmp_path / "t.jsonl")
    assert sorted((r["source_language"], r["language"]) for r in trans) == [("js", "python"), ("python", "js")]


@pytest.mark.slow
def test_watch_evaluates_each_checkpoint_once(tmp_path, tokenizer_model):
    data = str(shared_path("humaneval-x"))
    run = tmp_path / "run"
    for step in (1, 2):
        save_tiny(run / "checkpoints" / f"step-{step:08d}" / "model", tokenizer_model, step, step)
    argv = ["eval", "watch", str(run), "--once", "--data", data, "--greedy", *GEN]
    assert main(argv) == 0
    state = json.loads((run / "eval" / "state.json").read_text())
    assert state["done"] == ["step-00000001", "step-00000002"]
    md = (run / "eval" / "report" / "report.md").read_text()
    assert "## step 1" in md and "## step 2" in md
    stamp = (run / "eval" / "step-00000001" / "results.jsonl").stat().st_mtime
    save_tiny(run / "checkpoints" / "step-00000003" / "model", tokenizer_model, 3, 3)
    assert main(argv) == 0  # restarted: only the new checkpoint
    assert json.loads((run / "eval" / "state.json").read_text())["done"][-1] == "step-00000003"
    assert (run / "eval" / "step-00000001" / "results.jsonl").stat().st_mtime == stamp


@pytest.mark.slow
def test_pair_prompts_for_a_modality_checkpoint_python_incremental_and_mbpp(tmp_path, tokenizer_model):
    """A checkpoint trained on pairs (recorded in its manifest) is prompted in its pair layout, with its separated
    docstring table and prefix attention; HumanEval Python incremental and MBPP samples execute."""
    import torch

    from common.contracts import PairLayout, TokenizerRecord
    from megatron_code.checkpoint import save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    data, mbpp = str(shared_path("humaneval-x")), str(shared_path("mbpp", "mbpp.jsonl"))
    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(vocab_size=1280, max_position_embeddings=4096, embedding_separation="full"),
                          single_context())
    save_checkpoint(tmp_path / "ckpt", model, 5, TokenizerRecord(path=tokenizer_model),
                    PairLayout(order="docstring_first", normalize_whitespace=True), "prefix-code-clm")
    common = ["eval", "generate", "--checkpoint", str(tmp_path / "ckpt"), "--greedy", "--max-new-tokens", "8",
              "--problems", "2"]
    assert main([*common, "--data", data, "--languages", "python", "--task", "incremental",
                 "--output", str(tmp_path / "inc.jsonl")]) == 0
    assert main([*common, "--task", "mbpp", "--mbpp", mbpp, "--output", str(tmp_path / "mbpp.jsonl")]) == 0
    assert main([*common, "--data", data, "--languages", "python", "--prompt-format", "plain",
                 "--output", str(tmp_path / "plain.jsonl")]) == 0
    inc, mb, plain = (read_samples(tmp_path / f"{n}.jsonl") for n in ("inc", "mbpp", "plain"))
    assert {r["prompt_format"] for r in inc + mb} == {"pairs"} and {r["prompt_format"] for r in plain} == {"plain"}
    assert len(inc) > 4 and {r["prefix_lines"] for r in inc} >= {0, 1, 2} and len(mb) == 2
    assert [r["task_id"] for r in mb] == ["MBPP/11", "MBPP/12"]
    assert main(["eval", "execute", str(tmp_path / "inc.jsonl"), "--data", data, "--output",
                 str(tmp_path / "inc-r.jsonl")]) == 0
    assert main(["eval", "execute", str(tmp_path / "mbpp.jsonl"), "--mbpp", mbpp, "--output",
                 str(tmp_path / "mbpp-r.jsonl")]) == 0
    statuses = [r["status"] for r in read_results(tmp_path / "inc-r.jsonl") + read_results(tmp_path / "mbpp-r.jsonl")]
    assert len(statuses) == len(inc) + 2 and "passed" not in statuses  # random weights solve nothing
