"""Shared fixtures: the test corpus, a tokenizer trained on it, and the paths of the shared benchmark data."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from tests.corpus import corpus_inputs, write_corpus

SHARED = Path(os.environ.get("CODEGEEX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
# CI (.ci/run exports CI=true) has ../shared and every package `make test` installs: there a missing prerequisite is
# a failure, not a skip; GPU-only tests still skip without a GPU
STRICT = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """Skip the test saying what is missing; under CI=true, fail it instead."""
    if STRICT:
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str) -> ModuleType:
    """``pytest.importorskip`` that fails under CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} cannot be imported ({exc}): `make install` installs it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, int]]:
    """(inputs, expected skip counts) of the test corpus."""
    root = tmp_path_factory.mktemp("corpus")
    expected = write_corpus(root)
    return corpus_inputs(root), expected


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory, corpus: tuple[list[str], dict[str, int]]) -> str:
    """A small tokenizer trained on the test corpus plus a slice of the embedded default corpus."""
    from common.config import load_config
    from data_pipeline.config import TokenizerConfig
    from data_pipeline.train_tokenizer import run_tokenizer

    out = tmp_path_factory.mktemp("tok") / "code"
    cfg = load_config(TokenizerConfig, values={"inputs": [*corpus[0], "default"], "output": str(out),
                                               "vocab_size": 1200, "max_input_mb_per_language": 0.25})
    return str(run_tokenizer(cfg))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing (fail under CI=true)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        missing(f"{path} is not present (the shared benchmark data lives beside the project in ../shared)")
    return path
