"""`codegeex plan`: CodeGeeX's own run reproduced, reasons for choices that cannot work, the memory prediction
against a measured training peak, and `--validate` on fake process groups with the model on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.config import ConfigError
from common.devices import DEVICES
from launch.cli import main
from launch.planner import Choice, PlanRequest, plan, predict, structural_problem
from launch.validate import validate_job
from megatron_code.config import load_preset
from tests.model_utils import synthetic_store
from tests.train_utils import values, write_config


def codegeex_run() -> PlanRequest:
    # CodeGeeX's own run (MindSpore on Ascend) had no sequence parallelism
    return PlanRequest(load_preset("codegeex-13b"), 1536, DEVICES["Ascend910"], 3072, 2048, "float16",
                       sequence_parallel=False)


def test_codegeex_own_run_fits_only_with_recomputation():
    req = codegeex_run()
    fits, rejected = plan(req)
    by_key = {c.key: c for c in fits + rejected}
    own = by_key[(8, 1, 192, 2, 16, "full")]  # TP=8, DP=192, ZeRO-2, micro-batch 16: 3,072 sequences a step
    assert own.fits and 15 < own.memory["total"] < 32, own.memory
    assert own.memory["gradients"] < 0.05 and own.memory["optimizer"] < 0.2  # sharded over 192 ranks
    no_ckpt = by_key[(8, 1, 192, 2, 16, "off")]
    assert no_ckpt.problem.startswith("out of memory by") and no_ckpt.memory["activations"] > 100
    assert 0 < own.mfu < no_ckpt.mfu < req.efficiency  # recomputation and communication cost time
    assert all(a.step_s <= b.step_s for a, b in zip(fits, fits[1:], strict=False))
    assert all(c.memory["total"] <= 32 for c in fits)


def test_sequence_parallelism_divides_the_replicated_activations():
    sp, plain = codegeex_run(), codegeex_run()
    sp.sequence_parallel = True
    on = {c.key: c for c in sum(plan(sp), [])}[(8, 1, 192, 2, 16, "off")].memory["activations"]
    off = {c.key: c for c in sum(plan(plain), [])}[(8, 1, 192, 2, 16, "off")].memory["activations"]
    # 13B at TP=8: per layer (4 + (5 + 8)/8) sbh -> (9 + 8)/8 sbh; the logits' softmax and document mask stay
    assert 0.3 < on / off < 0.6, (on, off)


@pytest.mark.parametrize("tp, pp, mb, reason", [
    (3, 1, 1, "num_attention_heads (40) is not a multiple of TP (3)"),
    (16, 1, 1, "TP (16) spans nodes of 8 devices"),
    (8, 5, 1, "1536 devices are not a multiple of TP x PP (40)"),
    (8, 3, 1, "40 layers are not a multiple of PP (3)"),
    (8, 1, 32, "global batch (3072) is not a multiple of micro-batch (32) x DP (192)"),
])
def test_choices_that_cannot_work_say_why(tp, pp, mb, reason):
    assert structural_problem(codegeex_run(), tp, pp, mb) == reason


def test_plan_cli_ranks_and_explains(capsys):
    assert main(["plan", "--model", "codegeex-13b", "--gpus", "64", "--gpu", "A100-40", "--global-batch", "512",
                 "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "64 x A100-40" in out and "choices that do not work:" in out and "out of memory" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "| yes" in line]
    assert len(rows) == 5 and rows[0].split()[0] == "1"
    assert main(["plan", "--gpus", "8", "--gpu", "custom", "--memory-gib", "24", "--tflops", "100", "--model", "350m",
                 "--tp", "2", "--zero", "1", "--micro-batch", "4", "--recompute", "off", "--pp", "1"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1] in "0123456789-"
              and "| " in line and "rank" not in line]
    assert row.split()[1:7] == ["2", "1", "4", "1", "4", "off"]
    with pytest.raises(ConfigError, match="--gpu 'B200' is not one of"):
        from launch.cli import build_parser
        from launch.plan_cli import cmd_plan

        cmd_plan(build_parser().parse_args(["plan", "--gpu", "B200"]))


def test_predicted_step_time_follows_the_arithmetic():
    req = PlanRequest(load_preset("350m"), 8, DEVICES["H100-80"], 64, 2048)
    one, eight = Choice(1, 1, 8, 1, 8, "off"), Choice(1, 1, 8, 1, 8, "full")
    predict(req, one)
    predict(req, eight)
    assert eight.step_s > one.step_s * 1.2  # one more forward: 4/3 of the compute
    assert one.fits and one.comm_gb > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset, seq", [("tiny", 512), ("350m", 256)])
def test_memory_prediction_within_10_percent_of_the_measured_peak(preset, seq):
    out = subprocess.run([sys.executable, "-m", "tests.memory_probe", preset, str(seq)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    print(f"{preset} seq {seq}: measured peak {r['measured_gib']:.4f} GiB, predicted {r['predicted_gib']:.4f} GiB "
          f"({r['predicted_gib'] / r['measured_gib'] - 1:+.1%})")
    assert abs(r["predicted_gib"] / r["measured_gib"] - 1) < 0.10


def test_validate_builds_the_job_for_many_ranks_on_fake_groups(tmp_path, capsys):
    store = synthetic_store(tmp_path / "store", windows=8, seq_len=32)
    cfg = write_config(values(store, str(tmp_path / "run"), tp=4, micro_batch_size=2, data__global_batch_size=64),
                       tmp_path / "v.yaml")
    assert main(["plan", "--validate", cfg, "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "valid for 32 ranks = TP 4 x DP 8" in out and "accumulation 4" in out
    assert out.count("forward and backward shapes OK") == 5  # TP ranks 0-3 and the last rank
    for argv, error in ((["--world-size", "30"], r"world size \(30\) must be a multiple of tp \(4\)"),
                        (["--world-size", "40"], r"global_batch_size \(64\) must be a multiple of micro_batch_size "
                                                 r"\(2\) x data-parallel size \(10\)"),
                        (["--world-size", "24", "tp=3"], r"num_attention_heads \(4\)"),
                        (["--world-size", "8", "model.max_position_embeddings=16"], r"seq_len \(32\) exceeds"),
                        (["--world-size", "24", "tp=3", "model.num_attention_heads=3", "model.hidden_size=33",
                          "model.ffn_hidden_size=66", "model.vocab_size=129", "model.sequence_parallel=true",
                          "data.global_batch_size=16"],
                         r"sequence_parallel splits the sequence \(32\) over tp \(3\)")):
        with pytest.raises(ConfigError, match=error):
            validate_job(cfg, int(argv[1]), argv[2:])
    # with sequence parallelism: the same shapes, and its smaller activations in the prediction
    report = validate_job(cfg, 32, ["model.sequence_parallel=true"])
    assert "valid for 32 ranks" in report
