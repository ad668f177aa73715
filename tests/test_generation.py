"""Sampling: filters, seeds, stop rules, left padding; and the `codegeex model` commands."""

from __future__ import annotations

import pytest
import torch

from common.contracts import TokenizerRecord
from launch.cli import main
from megatron_code.checkpoint import save_checkpoint
from megatron_code.generation import SamplingConfig, filter_logits, generate
from megatron_code.model import CodeGeeXModel
from megatron_code.parallel import single_context
from tests.model_utils import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CodeGeeXModel(tiny_config(), single_context())


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, top_k=2)
    assert torch.isinf(filter_logits(logits, cfg)).tolist() == [[False, False, True, True]]
    cfg = SamplingConfig(temperature=1.0, top_p=0.7, top_k=0)
    assert torch.isinf(filter_logits(logits, cfg)).tolist() == [[False, False, True, True]]  # 0.5 + 0.25 >= 0.7
    cfg = SamplingConfig(temperature=1.0, top_p=0.5, top_k=0)
    assert torch.isinf(filter_logits(logits, cfg)).tolist() == [[False, True, True, True]]


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1.0, seed=1), pad_id=0)
    b = generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1.0, seed=1), pad_id=0)
    c = generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1.0, seed=2), pad_id=0)
    assert a == b and a != c and all(len(x) == 8 for x in a)


def test_left_padding_does_not_change_a_prompt(model):
    cfg = SamplingConfig(max_new_tokens=6, greedy=True)
    alone = generate(model, [[9, 10]], cfg, pad_id=0)[0]
    batched = generate(model, [[1, 2, 3, 4, 5, 6, 7], [9, 10]], cfg, pad_id=0)[1]
    assert alone == batched


def test_stop_rules_and_eod(model):
    cfg = SamplingConfig(max_new_tokens=10, greedy=True)
    full = generate(model, [[3, 4]], cfg, pad_id=0)[0]
    stopped = generate(model, [[3, 4]], cfg, pad_id=0, stop=lambda i, toks: len(toks) == 3)[0]
    assert stopped == full[:3]
    eod = full[2]
    assert generate(model, [[3, 4]], cfg, pad_id=0, eod_id=eod)[0] == full[:full.index(eod)]


def test_model_cli_offers_the_conversion_targets_the_library_has():
    from typing import get_args

    from megatron_code.cli import CONVERT_TARGETS
    from megatron_code.convert import Target

    assert get_args(Target) == CONVERT_TARGETS


def test_model_cli_info_convert_generate(model, tmp_path, capsys, caplog, tokenizer_model):
    assert main(["model", "info", "--preset", "codegeex-13b"]) == 0
    out = capsys.readouterr().out
    assert "12,873,943,040 parameters" in out and "top-query" in out and "GiB" in out
    save_checkpoint(tmp_path / "ck", model, tokenizer=TokenizerRecord(path=tokenizer_model))
    assert main(["model", "convert", str(tmp_path / "ck"), "--to", "codegeex", "--output", str(tmp_path / "c.pt")]) == 0
    assert main(["model", "convert", str(tmp_path / "c.pt"), "--to", "native", "--output", str(tmp_path / "back"),
                 "--tp", "2", "--head-dim", "8"]) == 0
    assert len(list((tmp_path / "back").glob("*.safetensors"))) == 2
    assert main(["model", "convert", str(tmp_path / "back"), "--to", "safetensors",
                 "--output", str(tmp_path / "m.safetensors")]) == 0
    from safetensors.torch import load_file

    flat = load_file(str(tmp_path / "m.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(flat[name], p.detach()), name
    args = ["--prompt", "def f(", "--tokenizer", tokenizer_model, "max_new_tokens=5", "greedy=true"]
    assert main(["model", "generate", "--checkpoint", str(tmp_path / "back"), *args]) == 1
    assert "but the model's padded vocabulary has 128 rows" in caplog.text
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "big", CodeGeeXModel(tiny_config(vocab_size=1280), single_context()))
    capsys.readouterr()
    assert main(["model", "generate", "--checkpoint", str(tmp_path / "big"), *args]) == 0
    assert capsys.readouterr().out.startswith("def f(")


def test_sampling_draws_from_the_filtered_softmax():
    """Inverse-CDF draws over evenly spread uniforms reproduce softmax(filter_logits(...)) to within 1/N."""
    from megatron_code.generation import sample_next

    torch.manual_seed(3)
    logits = torch.randn(3, 50) * 2
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for cfg in (SamplingConfig(temperature=0.7, top_p=0.9), SamplingConfig(temperature=1.3, top_p=1.0, top_k=5)):
        want = torch.softmax(filter_logits(logits, cfg), dim=-1)  # (3, 50)
        for row in range(3):
            drawn = sample_next(logits[row:row + 1].expand(n, -1), cfg, u)  # (n,)
            got = torch.bincount(drawn, minlength=50).double() / n
            assert (got - want[row].double()).abs().max() < 2.0 / n, cfg
    assert sample_next(logits, SamplingConfig(greedy=True), u[:3]).tolist() == logits.argmax(-1).tolist()


def test_a_prompts_sample_does_not_depend_on_its_batch_and_finished_rows_leave(model):
    """Seeded per prompt: alone, or batched with others that stop early (so the batch shrinks mid-generation) and
    with a copy of itself (prefilled once, sampled apart), a prompt gets the same tokens; each step reads the device
    once."""
    from tests.device_audit import HostSyncCounter

    cfg = SamplingConfig(max_new_tokens=12, temperature=1.2, top_p=0.95)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9], [4, 4, 4, 4], [2, 3], [5, 6, 7]]
    seeds = [11, 22, 33, 44, 55, 66]
    alone = [generate(model, [p], cfg, pad_id=0, seeds=[s])[0] for p, s in zip(prompts, seeds, strict=True)]

    def stop(i: int, toks: list[int]) -> bool:  # rows 0, 2 and 3 stop after 2, 3 and 4 tokens
        return len(toks) == {0: 2, 2: 3, 3: 4}.get(i, 99)

    with HostSyncCounter() as counter:
        batched = generate(model, prompts, cfg, pad_id=0, seeds=seeds, stop=stop)
    assert batched[1] == alone[1] and batched[4] == alone[4] and batched[5] == alone[5] and len(alone[1]) == 12
    assert alone[5] != alone[0][:12]  # the copy drew its own sample
    assert [batched[i] for i in (0, 2, 3)] == [alone[0][:2], alone[2][:3], alone[3][:4]]
    assert counter.count == 12, counter.report()  # one per step, shrinking included


def test_prefill_in_length_groups_equals_each_prompt_alone(model):
    """Ten prompts of lengths 1 to 10 are prefilled in groups of similar length (each padded to its own longest)
    and written into one cache: every prompt continues as it does alone, greedy and seeded."""
    from megatron_code.generation import _groups

    prompts = [[(3 * i + j) % 100 + 2 for j in range(i + 1)] for i in range(10)][::-1]
    assert len(_groups([len(p) for p in prompts])) == 4
    for cfg in (SamplingConfig(max_new_tokens=5, greedy=True), SamplingConfig(max_new_tokens=5, temperature=1.1)):
        alone = [generate(model, [p], cfg, pad_id=0, seeds=[i])[0] for i, p in enumerate(prompts)]
        assert generate(model, prompts, cfg, pad_id=0, seeds=list(range(10))) == alone


def test_top_k_with_top_p_and_draws_next_to_one():
    """top-p applies to the top-k tokens' own softmax (as filter_logits does), and a draw a hair below 1 never takes
    a masked token."""
    from megatron_code.generation import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert sample_next(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=0.6), torch.tensor([0.9])).item() == 0
    masked = torch.tensor([[1.0, 2.0, 0.5, float("-inf"), float("-inf")]])
    for cfg in (SamplingConfig(temperature=1.0, top_p=1.0), SamplingConfig(temperature=1.0, top_p=0.99, top_k=4)):
        assert sample_next(masked, cfg, torch.tensor([1 - 1e-9], dtype=torch.float64)).item() in (0, 1, 2)


def test_each_prompt_has_its_own_room_before_the_position_limit(model):
    """A short prompt next to one near max_position_embeddings gets as many tokens as alone; the long one stops at
    the table's end."""
    cfg = SamplingConfig(max_new_tokens=8, greedy=True)
    limit = model.cfg.max_position_embeddings
    near = list(range(2, 2 + limit - 3))  # room for 4 new tokens
    both = generate(model, [near, [5, 6]], cfg, pad_id=0)
    assert len(both[0]) == 4 and both[1] == generate(model, [[5, 6]], cfg, pad_id=0)[0] and len(both[1]) == 8
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [list(range(limit + 1))], cfg, pad_id=0)
