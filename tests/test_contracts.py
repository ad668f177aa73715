"""The contracts between stages: manifests are read and written only through common.contracts, every wrong or
missing field is named with its file, older versions are upgraded or refused by name; and the layers hold."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.contracts import (
    CheckpointManifest,
    LanguageCounts,
    ManifestError,
    PairLayout,
    ShardEntry,
    StoreError,
    StoreManifest,
    TensorSpec,
    TokenizerRecord,
    load_checkpoint_manifest,
    load_store_manifest,
    manifest_to_json,
    write_manifest,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data_pipeline", "megatron_code", "eval_harness", "launch")


def store_manifest(pairs: bool = True) -> StoreManifest:
    return StoreManifest(
        seq_len=8, window=9, token_dtype="uint16",
        columns=["tokens", "doc_starts", "num_tokens", "language"] + (["modality"] if pairs else []),
        tokenizer=TokenizerRecord(path="tok.model", sha256="ab" * 32, vocab_size=100, eod_id=1, pad_id=0, mask_id=5),
        pairs=PairLayout(order="signature_first", normalize_whitespace=True) if pairs else None,
        total_windows=3, languages={"Python": LanguageCounts(documents=2, pairs=2, tokens=20, windows=3)},
        shards=[ShardEntry(file="shards/shard-00000.arrow", windows=3, bytes=10, sha256="cd" * 32)],
        config={"extract": {"pair_order": "docstring_first"}})


def write_raw(directory: Path, data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(data))
    return directory


def test_store_manifest_round_trip_and_field_errors(tmp_path):
    m = store_manifest()
    write_manifest(tmp_path / "s", m)
    assert load_store_manifest(tmp_path / "s") == m
    good = manifest_to_json(m)
    f = tmp_path / "bad" / "manifest.json"
    cases = [
        ({**good, "window": "nine"}, "window: expected an integer"),
        ({k: v for k, v in good.items() if k != "shards"}, "missing key(s) ['shards']"),
        ({**good, "tokenizer": {**good["tokenizer"], "vocab_size": 0}}, "tokenizer.vocab_size (0) must be positive"),
        ({**good, "tokenizer": {**good["tokenizer"], "vocab": 3}}, "unknown key(s) ['vocab'] in section 'tokenizer'"),
        ({**good, "shards": [{"file": "x", "windows": 1, "bytes": 1}]}, "missing key(s) ['sha256'] in section 'shards[0]'"),
        ({**good, "languages": {"Python": {"tokens": "many"}}}, "languages.Python.tokens: expected an integer"),
        ({**good, "pairs": {"order": "code_first"}}, "pairs.order: 'code_first' is not one of"),
        ({**good, "pairs": None}, "pairs (None) must be given exactly when the columns have modality"),
        ({**good, "format": "megatron-indexed"}, "format 'megatron-indexed' is not 'codegeex-token-store'"),
    ]
    for data, message in cases:
        write_raw(f.parent, data)
        with pytest.raises(StoreError) as err:
            load_store_manifest(f.parent)
        assert str(f) in str(err.value) and message in str(err.value), (message, str(err.value))
    f.write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: not valid JSON"):
        load_store_manifest(f.parent)
    with pytest.raises(StoreError, match="manifest.json does not exist"):
        load_store_manifest(tmp_path / "nowhere")


def test_store_manifest_versions(tmp_path):
    """Version 1 kept the pair layout only in the build's config: read and upgraded; unknown versions refused."""
    v1 = manifest_to_json(store_manifest())
    v1.update(schema_version=1, config={"extract": {"pair_order": "signature_first", "normalize_whitespace": True}})
    del v1["pairs"]
    m = load_store_manifest(write_raw(tmp_path / "v1", v1))
    assert m.schema_version == 2 and m.pairs == PairLayout(order="signature_first", normalize_whitespace=True)
    plain = manifest_to_json(store_manifest(pairs=False))
    plain["schema_version"] = 1
    del plain["pairs"]
    assert load_store_manifest(write_raw(tmp_path / "v1-plain", plain)).pairs is None
    for version, message in ((0, "schema_version 0 is not one this code reads (1, 2); rebuild it"),
                             (3, "schema_version 3 is not one this code reads (1, 2); it is newer"),
                             (None, "schema_version None is not one this code reads")):
        with pytest.raises(StoreError, match=rf"v{version}/manifest.json: {message}".replace("(", r"\(").replace(")", r"\)")):
            load_store_manifest(write_raw(tmp_path / f"v{version}", {**plain, "schema_version": version}))


def test_checkpoint_manifest_round_trip_and_errors(tmp_path):
    m = CheckpointManifest(model={"num_layers": 2}, tp_size=2, step=4,
                           tensors={"w": TensorSpec(shape=[4, 2], partition_dim=0)},
                           tokenizer=TokenizerRecord(path="t.model"), pairs=PairLayout(), objective="prefix-code-clm")
    write_manifest(tmp_path / "c", m)
    back = load_checkpoint_manifest(tmp_path / "c")
    (tmp_path / "c" / "t.model").write_bytes(b"tok")  # the recorded path is relative to the checkpoint directory
    assert back == m and back.tokenizer_path(None, tmp_path / "c") == str(tmp_path / "c" / "t.model")
    assert back.tokenizer_path("other", "c") == "other"
    with pytest.raises(ValueError, match="c: the checkpoint names no tokenizer; pass --tokenizer"):
        CheckpointManifest(model={}, tp_size=1, tensors={}).tokenizer_path(None, "c")
    good = manifest_to_json(m)
    for data, message in (({**good, "tp_size": 0}, "tp_size (0) must be at least 1"),
                          ({**good, "tensors": {"w": {"shape": [4], "partition_dim": "rows"}}},
                           "tensors.w.partition_dim: expected an integer, got 'rows'"),
                          ({**good, "format": "codegeex-token-store"}, "format 'codegeex-token-store' is not"),
                          ({**good, "schema_version": 2}, "schema_version 2 is not one this code reads (1); it is newer")):
        write_raw(tmp_path / "bad", data)
        with pytest.raises(ManifestError) as err:
            load_checkpoint_manifest(tmp_path / "bad")
        assert str(tmp_path / "bad" / "manifest.json") in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        load_checkpoint_manifest(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="tp_size"):  # the writer checks what it writes
        write_manifest(tmp_path / "w", CheckpointManifest(model={}, tp_size=0, tensors={}))
    assert not (tmp_path / "w" / "manifest.json").exists()


def _python_files() -> list[Path]:
    return [p for d in (*PACKAGES, "tests", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]


def test_manifests_are_read_and_written_only_through_the_contracts():
    """No module but common/contracts.py parses or serialises a manifest itself (json calls on a manifest file or
    a whole manifest; a manifest's model config written into safetensors metadata is not one)."""
    offenders = []
    for path in _python_files():
        if path == ROOT / "common" / "contracts.py":
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"
                    and node.func.attr in ("load", "loads", "dump", "dumps")):
                segment = ast.get_source_segment(text, node) or ""
                arg = ast.get_source_segment(text, node.args[0]) or "" if node.args else ""
                whole = re.fullmatch(r"\w*manifest\w*(\.read_text\(\))?", arg, re.I)  # json.dumps(manifest) and kin
                if "manifest.json" in segment or "MANIFEST" in segment or whole:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {segment[:80]}")
    assert not offenders, "manifests handled outside common.contracts:\n" + "\n".join(offenders)


def test_import_contract_catches_an_upward_import(tmp_path):
    """The layers contract of `make lint` holds, and fails when a lower package imports a higher one."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail(f"{lint} missing: `make install` installs import-linter (the [dev] extra)")
    ok = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-3000:]
    scratch = tmp_path / "tree"
    for d in PACKAGES:
        shutil.copytree(ROOT / d, scratch / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", scratch)
    with open(scratch / "common" / "io.py", "a") as fh:  # the bottom layer reaching up, lazily
        fh.write("\n\ndef _upward() -> None:\n    from megatron_code import model  # noqa: F401\n")
    with open(scratch / "data_pipeline" / "store.py", "a") as fh:  # a circle inside a package
        fh.write("\n\ndef _circle() -> None:\n    from data_pipeline import build  # noqa: F401\n")
    broken = subprocess.run([str(lint), "--no-cache"], cwd=scratch, capture_output=True, text=True,
                            env={"PYTHONPATH": str(scratch), "PATH": "/usr/bin:/bin"})
    assert broken.returncode == 1, broken.stdout[-3000:]
    assert "common.io -> megatron_code.model" in broken.stdout
    assert "No cycles are allowed in data_pipeline" in broken.stdout
