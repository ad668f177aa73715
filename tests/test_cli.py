"""The `codegeex` command: groups, help, and errors that name what is wrong."""

from __future__ import annotations

import subprocess
import sys

from launch.cli import main


def test_help_lists_the_data_group():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "data" in out
    out = subprocess.run([sys.executable, "-m", "launch.cli", "data", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("build", "merge", "tokenizer", "inspect"):
        assert cmd in out


def test_config_errors_exit_2_naming_the_key(tmp_path, caplog, tokenizer_model):
    args = ["data", "build", "--input", str(tmp_path), "--tokenizer", tokenizer_model, "--output", str(tmp_path / "o")]
    assert main([*args, "pack.sq_len=3"]) == 2
    assert ("override 'pack.sq_len=3': unknown key 'sq_len' in section 'pack' (did you mean 'seq_len'?); valid keys: "
            "mode, open_windows, seq_len, shard_mb") in caplog.text
    assert main([*args, "--seq-len", "4"]) == 2
    assert "pack.seq_len (4) must be at least 8" in caplog.text
    assert main(["data", "build", "--input", str(tmp_path / "missing"), "--tokenizer", tokenizer_model,
                 "--output", str(tmp_path / "o2")]) == 1
    assert "missing does not exist" in caplog.text
    assert main(["data", "inspect", str(tmp_path)]) == 1
    assert "manifest.json does not exist" in caplog.text


def test_log_level_anywhere_before_a_nested_command():
    from launch.cli import pop_log_level

    assert pop_log_level(["data", "inspect", "S", "--log-level", "DEBUG"]) == ("DEBUG", ["data", "inspect", "S"])
    assert pop_log_level(["--log-level=WARNING", "plan", "--model", "tiny"]) == ("WARNING", ["plan", "--model", "tiny"])
    nested = ["launch", "local", "--nproc", "2", "--", "eval", "generate", "--log-level", "DEBUG"]
    assert pop_log_level(nested) == (None, nested)  # the nested job's own flag stays with it
