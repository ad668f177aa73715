"""Checkpoints carry what generation needs: the tokenizer copied beside the shards and named relative to them, every
file readable by the group whatever the umask, one resolver for run / checkpoints / step / model directories, and
conversion that creates its output folders and never replaces what is not a checkpoint."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch.cli import main
from tests.conftest import shared_path
from tests.model_utils import tiny_config

STEP = "step-00000003"


def save_run(run: Path, tokenizer: str, step: int = 3) -> Path:
    """A tiny checkpoint saved as training saves it (RUN/checkpoints/step-N/model, then ``latest``); the tokenizer
    recorded as given (e.g. relative to the working directory). Returns the model directory."""
    import torch

    from common.contracts import TokenizerRecord
    from data_pipeline.tokenizer import CodeTokenizer
    from megatron_code.checkpoint import point_latest, save_checkpoint
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context

    tok = CodeTokenizer(tokenizer)
    torch.manual_seed(0)
    model = CodeGeeXModel(tiny_config(vocab_size=1280, max_position_embeddings=4096), single_context())
    name = f"step-{step:08d}"
    save_checkpoint(run / "checkpoints" / name / "model", model, step,
                    TokenizerRecord(path=tokenizer, vocab_size=tok.vocab_size, eod_id=tok.eod_id, pad_id=tok.pad_id))
    point_latest(run / "checkpoints", name)
    return run / "checkpoints" / name / "model"


def relative_run(tmp_path: Path, tokenizer_model: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run saved from ``tmp_path/train`` with the tokenizer named relative to it (as a config would name it)."""
    train = tmp_path / "train"
    (train / "tok").mkdir(parents=True)
    for suffix in (".model", ".vocab"):
        shutil.copy(Path(tokenizer_model).with_suffix(suffix), train / "tok" / f"code{suffix}")
    monkeypatch.chdir(train)
    save_run(train / "run", "tok/code.model")
    return train / "run"


def generate(checkpoint: Path, *extra: str) -> int:
    return main(["model", "generate", "--checkpoint", str(checkpoint), "--prompt", "def add(a, b):", *extra,
                 "max_new_tokens=3", "greedy=true"])


def test_a_checkpoint_carries_its_tokenizer_and_generates_from_anywhere(tmp_path, tokenizer_model, monkeypatch,
                                                                         capsys):
    from megatron_code.checkpoint import read_manifest

    run = relative_run(tmp_path, tokenizer_model, monkeypatch)
    model = run / "checkpoints" / STEP / "model"
    original = Path(tokenizer_model).read_bytes()
    assert (model / "tokenizer.model").read_bytes() == original
    assert (model / "tokenizer.vocab").read_bytes() == Path(tokenizer_model).with_suffix(".vocab").read_bytes()
    record = read_manifest(model).tokenizer
    assert record is not None and record.path == "tokenizer.model"
    assert record.sha256 == hashlib.sha256(original).hexdigest() and record.vocab_size > 0  # the ids are kept
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert generate(run) == 0
    assert capsys.readouterr().out.startswith("def add(a, b):")
    shutil.rmtree(tmp_path / "train" / "tok")  # the original tokenizer gone, the run moved: still self-contained
    moved = shutil.move(str(run), str(tmp_path / "moved"))
    assert generate(Path(moved)) == 0 and generate(Path(moved) / "checkpoints" / STEP) == 0


def test_eval_generate_from_another_directory(tmp_path, tokenizer_model, monkeypatch):
    from eval_harness.samples import read_samples

    data = str(shared_path("humaneval-x"))
    run = relative_run(tmp_path, tokenizer_model, monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "samples.jsonl"
    assert main(["eval", "generate", "--checkpoint", str(run), "--data", data, "--problems", "1", "--languages",
                 "python", "--max-new-tokens", "4", "--output", str(out)]) == 0
    rows = read_samples(out)
    assert len(rows) == 1 and rows[0]["checkpoint_step"] == 3


def test_a_tokenizer_with_another_sha256_is_refused_naming_both(tmp_path, tokenizer_model, caplog):
    from megatron_code.checkpoint import read_manifest

    model = save_run(tmp_path / "run", tokenizer_model)
    want = read_manifest(model).tokenizer.sha256
    (model / "tokenizer.model").write_bytes(b"another tokenizer")
    got = hashlib.sha256(b"another tokenizer").hexdigest()
    assert generate(tmp_path / "run") == 1
    assert f"has sha256 {got}, the checkpoint records {want}" in caplog.text and "Traceback" not in caplog.text
    assert generate(tmp_path / "run", "--tokenizer", tokenizer_model) == 0  # an explicit tokenizer is taken as it is


def test_older_checkpoints_find_a_tokenizer_recorded_absolute_or_relative_to_the_cwd(tmp_path, tokenizer_model,
                                                                                    monkeypatch, caplog):
    from common.contracts import write_manifest
    from megatron_code.checkpoint import read_manifest

    model = save_run(tmp_path / "run", tokenizer_model)
    (model / "tokenizer.model").unlink()  # as written before checkpoints carried their tokenizer
    manifest = read_manifest(model)

    def record(path: str) -> None:
        assert manifest.tokenizer is not None
        manifest.tokenizer.path = path
        write_manifest(model, manifest)

    record(str(Path(tokenizer_model).resolve()))
    assert read_manifest(model).tokenizer_path(None, model) == str(Path(tokenizer_model).resolve())
    monkeypatch.chdir(Path(tokenizer_model).parent)
    record(Path(tokenizer_model).name)
    assert read_manifest(model).tokenizer_path(None, model) == Path(tokenizer_model).name
    assert "found relative to the working directory" in caplog.text
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        read_manifest(model).tokenizer_path(None, model)
    assert (f"{model}: the tokenizer it records ({Path(tokenizer_model).name}) is not there (looked at "
            f"{model / Path(tokenizer_model).name}, {Path(tokenizer_model).name})") in str(err.value)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root: Path) -> dict[str, str]:
    """What under ``root`` (and ``root``) is neither a 0755 folder nor a 0644 file: relative path -> its mode."""
    found = {str(p.relative_to(root)): (p, stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}
    return {name: oct(mode) for name, (p, mode) in found.items() if mode != (0o755 if p.is_dir() else 0o644)}


class FakeEngine:
    """What save_training_checkpoint asks of DeepSpeed's engine: files written by torch.save (0600 under umask 077)."""

    lr_scheduler = None
    global_steps = global_samples = skipped_steps = 5

    def __init__(self) -> None:
        import torch

        self.optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, path: str, tag: str, save_latest: bool) -> None:
        import torch

        (Path(path) / tag).mkdir(parents=True)
        torch.save({"optimizer": torch.zeros(2)}, Path(path) / tag / "mp_rank_00_model_states.pt")


def test_every_checkpoint_file_is_group_readable_under_umask_077(tmp_path, tokenizer_model):

    from common.contracts import TokenizerRecord
    from megatron_code.model import CodeGeeXModel
    from megatron_code.parallel import single_context
    from megatron_code.train_checkpoint import save_training_checkpoint

    root = tmp_path / "run" / "checkpoints"
    with umask(0o077):
        model = CodeGeeXModel(tiny_config(vocab_size=1280), single_context())
        store = SimpleNamespace(tokenizer=TokenizerRecord(path=tokenizer_model), pairs=None)  # a StoreManifest's part
        final = save_training_checkpoint(root, 5, FakeEngine(), model, {"sampler": {}}, keep=2, data=store,
                                         elastic=False)
        assert main(["model", "convert", str(tmp_path / "run"), "--to", "native", "--tp", "2",
                     "--output", str(tmp_path / "tp2")]) == 0
        for to, name in (("codegeex", "m.pt"), ("safetensors", "m.safetensors")):
            assert main(["model", "convert", str(root), "--to", to, "--output", str(tmp_path / name)]) == 0
    files = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert {"latest", f"{final.name}/trainer.json", f"{final.name}/rng/rank-00000.safetensors",
            f"{final.name}/deepspeed/state/mp_rank_00_model_states.pt", f"{final.name}/model/tokenizer.model",
            f"{final.name}/model/manifest.json", f"{final.name}/model/model-tp00-of-01.safetensors"} <= files
    assert wrong_modes(root) == {} and wrong_modes(tmp_path / "tp2") == {}
    assert {oct(stat.S_IMODE((tmp_path / n).stat().st_mode)) for n in ("m.pt", "m.safetensors")} == {"0o644"}


def test_convert_creates_missing_output_folders_for_every_target(tmp_path, tokenizer_model, caplog):
    from megatron_code.checkpoint import read_manifest

    save_run(tmp_path / "run", tokenizer_model)
    native, pt, st = tmp_path / "a" / "b" / "tp2", tmp_path / "c" / "d" / "m.pt", tmp_path / "e" / "f" / "m.safetensors"
    assert main(["model", "convert", str(tmp_path / "run"), "--to", "native", "--tp", "2", "--output", str(native)]) == 0
    assert main(["model", "convert", str(tmp_path / "run"), "--to", "codegeex", "--output", str(pt)]) == 0
    assert main(["model", "convert", str(tmp_path / "run" / "checkpoints" / STEP), "--to", "safetensors",
                 "--output", str(st)]) == 0
    assert pt.is_file() and st.is_file() and not list(tmp_path.glob("**/*.tmp"))
    manifest = read_manifest(native)
    assert manifest.tp_size == 2 and manifest.tokenizer and manifest.tokenizer.path == "tokenizer.model"
    assert (native / "tokenizer.model").read_bytes() == Path(tokenizer_model).read_bytes()
    assert generate(native) == 0
    back = tmp_path / "g" / "back"  # the .pt layout records no tokenizer: --tokenizer gives it one
    assert main(["model", "convert", str(pt), "--to", "native", "--output", str(back), "--head-dim", "8",
                 "--tokenizer", tokenizer_model]) == 0
    record = read_manifest(back).tokenizer
    assert record and record.path == "tokenizer.model" and record.vocab_size == manifest.tokenizer.vocab_size
    assert generate(back) == 0
    assert main(["model", "convert", str(tmp_path / "run"), "--to", "codegeex", "--output", str(pt.parent)]) == 1
    assert f"{pt.parent} is a directory: --to codegeex writes one file" in caplog.text


def test_convert_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, tokenizer_model, caplog):
    save_run(tmp_path / "run", tokenizer_model)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    convert = ["model", "convert", str(tmp_path / "run"), "--to", "native", "--output"]
    assert main([*convert, str(precious)]) == 1
    assert (precious / "notes.txt").read_text() == "keep me"
    assert f"{precious.resolve()} exists and is not a checkpoint directory (no manifest.json)" in caplog.text
    assert main([*convert, str(precious / "notes.txt")]) == 1 and "is a file" in caplog.text
    assert main([*convert, str(tmp_path / "tp1")]) == 0
    assert main([*convert[:-1], "--tp", "2", "--output", str(tmp_path / "tp1")]) == 0  # a checkpoint is replaced
    assert sorted(p.name for p in (tmp_path / "tp1").glob("*.safetensors")) == ["model-tp00-of-02.safetensors",
                                                                                 "model-tp01-of-02.safetensors"]
    assert main(["model", "convert", str(tmp_path / "missing"), "--to", "codegeex", "--output",
                 str(tmp_path / "x.pt")]) == 1
    assert f"{tmp_path / 'missing'} does not exist (expected a model directory" in caplog.text
    assert "Traceback" not in caplog.text


def test_run_checkpoints_step_and_model_directories_resolve_alike(tmp_path, tokenizer_model):
    from megatron_code.checkpoint import resolve_model_dir

    run = tmp_path / "run"
    model = save_run(run, tokenizer_model)
    for given in (run, run / "checkpoints", model.parent, model):
        assert resolve_model_dir(given) == model
    (run / "checkpoints" / "latest").unlink()  # no pointer: the newest step directory
    newer = save_run(tmp_path / "other", tokenizer_model, step=10)
    shutil.move(str(newer.parent), str(run / "checkpoints"))
    (run / "checkpoints" / ".tmp-step-00000020" / "model").mkdir(parents=True)  # an unfinished save is not offered
    assert resolve_model_dir(run) == run / "checkpoints" / "step-00000010" / "model"
    (run / "checkpoints" / "latest").write_text("step-00000099\n")  # names nothing: the newest before it
    assert resolve_model_dir(run) == run / "checkpoints" / "step-00000010" / "model"
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    with pytest.raises(FileNotFoundError, match="its latest pointer names 'step-00000002', which holds no model"):
        resolve_model_dir(run)
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint"):
        resolve_model_dir(model / "manifest.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        resolve_model_dir(tmp_path)
