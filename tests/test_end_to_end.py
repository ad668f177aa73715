"""The whole path on a small slice, as `make quickstart` walks it: source files on this machine -> token store ->
sampler -> TP=2 training (2 gloo ranks) -> checkpoint (resumed exactly; converted to CodeGeeX's layout and back) ->
HumanEval-X generation in five languages -> sandboxed execution -> pass@k and the report. Each hand-off is checked on
what the previous stage really wrote."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_harness.execution import STATUSES
from eval_harness.samples import read_results, read_samples
from launch.cli import main
from tests.conftest import shared_path

LANGS = ["python", "cpp", "java", "js", "go"]


def check_store(store: Path) -> None:
    from common.contracts import load_store_manifest
    from data_pipeline.store import TokenStore

    m = load_store_manifest(store)
    assert m.total_windows == sum(s.windows for s in m.shards) == len(TokenStore(store)) > 50
    assert m.total_tokens == sum(lang.tokens for lang in m.languages.values())
    assert m.total_documents == sum(lang.documents for lang in m.languages.values())
    assert {"Python", "C"} <= set(m.languages)


def train_and_resume(store: Path, tmp: Path) -> Path:
    """16 steps straight, and 8 + 8 resumed, at TP=2: the same losses bit for bit, falling; returns the last step."""
    from tests.dist import run_ranks
    from tests.test_training import run_configs
    from tests.train_utils import values

    base = dict(tp=2, train_steps=16, optim__decay_steps=16, checkpoint__interval=8, model__vocab_size=1280,
                model__max_position_embeddings=512)
    straight = values(str(store), str(tmp / "train"), **base)
    first = values(str(store), str(tmp / "resumed"), **{**base, "train_steps": 8})
    second = values(str(store), str(tmp / "resumed"), **base)
    ms, _, mr = run_ranks(run_configs, 2, [straight, first, second])[0]
    losses = [r["loss"] for r in ms]
    assert [r["step"] for r in mr] == list(range(1, 17)) and [r["loss"] for r in mr] == losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses
    return tmp / "train" / "checkpoints" / "step-00000016" / "model"


def check_checkpoint_files(root: Path, tokenizer: str) -> None:
    """Each checkpoint carries the tokenizer, named relative to its model directory; every file is 0644 and every
    folder 0755 although the ranks ran under umask 077 (DeepSpeed's, torch's and safetensors' files included)."""
    from megatron_code.checkpoint import read_manifest

    models = sorted(root.glob("step-*/model"))
    assert [m.parent.name for m in models] == ["step-00000008", "step-00000016"]
    for model in models:
        record = read_manifest(model).tokenizer
        assert record is not None and record.path == "tokenizer.model"
        assert (model / "tokenizer.model").read_bytes() == Path(tokenizer).read_bytes()
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    assert any(p.suffix == ".pt" for p in modes)  # DeepSpeed's files are there
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)}
    assert wrong == {}, wrong


def check_conversion(ckpt: Path, store: Path, tmp: Path) -> None:
    """The checkpoint in CodeGeeX's .pt layout and back: the same weights and the same logits, exactly."""
    from data_pipeline.sampler import DataSampler, SamplerConfig, SourceConfig
    from megatron_code.checkpoint import load_model
    from megatron_code.objectives import prepare_batch
    from megatron_code.parallel import single_context

    assert main(["model", "convert", str(ckpt), "--to", "codegeex", "--output", str(tmp / "codegeex.pt")]) == 0
    assert main(["model", "convert", str(tmp / "codegeex.pt"), "--to", "native", "--output", str(tmp / "back"),
                 "--head-dim", "8"]) == 0  # hidden 32, 4 heads (the .pt layout does not record heads)
    pc = single_context()
    batch = DataSampler(SamplerConfig(sources=[SourceConfig(path=str(store))], global_batch_size=2, seed=0)).next_batch()
    inp = prepare_batch(batch)
    trained, back = load_model(ckpt, pc), load_model(tmp / "back", pc)
    want_sd, got_sd = trained.state_dict(), back.state_dict()
    assert set(got_sd) == set(want_sd)
    for name, tensor in want_sd.items():  # the .pt layout copies weights: every one bit for bit, dtype kept
        if tensor is None:  # megatron-core's layers keep an empty `_extra_state` entry
            assert got_sd[name] is None, name
            continue
        assert got_sd[name].dtype == tensor.dtype and torch.equal(got_sd[name], tensor), name
    with torch.no_grad():
        want = trained(inp.tokens, inp.position_ids, inp.mask)[0]
        got = back(inp.tokens, inp.position_ids, inp.mask)[0]
    assert torch.equal(got, want)  # same weights, same computation: the same logits exactly


@pytest.mark.slow
@pytest.mark.distributed
def test_source_files_to_report_on_a_small_slice(tmp_path, tokenizer_model):
    data = str(shared_path("humaneval-x"))
    store = tmp_path / "store"
    assert main(["data", "build", "--input", "default", "--tokenizer", tokenizer_model, "--output", str(store),
                 "--seq-len", "64", "--workers", "2", "max_input_mb_per_language=0.25"]) == 0
    check_store(store)
    umask = os.umask(0o077)  # the spawned ranks inherit it
    try:
        ckpt = train_and_resume(store, tmp_path)
    finally:
        os.umask(umask)
    check_checkpoint_files(tmp_path / "train" / "checkpoints", tokenizer_model)
    check_conversion(ckpt, store, tmp_path)
    samples, results = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    assert main(["eval", "generate", "--checkpoint", str(tmp_path / "train"), "--data", data, "--languages", "all",
                 "--problems", "2", "--n", "2", "--max-new-tokens", "24", "--output", str(samples)]) == 0
    generated = read_samples(samples)
    assert len(generated) == 20 and {r["language"] for r in generated} == set(LANGS)
    assert {r["checkpoint_step"] for r in generated} == {16}
    # beside the model's samples, the reference solution of each problem: a known pass among the model's failures
    assert main(["eval", "canonical", "--data", data, "--output", str(tmp_path / "canonical.jsonl")]) == 0
    keep = {r["task_id"] for r in generated}
    with open(samples, "a") as fh:
        for r in read_samples(tmp_path / "canonical.jsonl"):
            if r["task_id"] in keep:
                fh.write(json.dumps({k: v for k, v in r.items() if k != "sample_index"}) + "\n")
    assert main(["eval", "execute", str(samples), "--data", data, "--output", str(results)]) == 0
    rows = read_results(results)
    assert len(rows) == 30 and all(r["status"] in STATUSES for r in rows)
    from eval_harness.scoring import score

    scores = score(rows, ks=[1, 2])
    for lang in LANGS:  # pass@1 = mean over problems of passed / samples, from the statuses themselves
        mine = [r for r in rows if r["language"] == lang]
        by_task = {t: [r["status"] == "passed" for r in mine if r["task_id"] == t] for t in {r["task_id"] for r in mine}}
        expected = float(np.mean([sum(v) / len(v) for v in by_task.values()]))
        assert scores["generation"][lang]["pass@k"][1] == pytest.approx(expected) and expected >= 1 / 3
    assert main(["eval", "report", str(results), "--output", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img src=\"data:image/png" in html and "pass@1" in (tmp_path / "report" / "report.md").read_text()
