# Two entry points: `make quickstart` and `make test`. Everything they need is installed here, so a fresh
# machine (or CI's clean clone) needs nothing done by hand.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QS ?= runs/quickstart
PIP := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed's JIT-compiled ops (fused Adam, shared-memory comm) live with the environment that built them, and are
# built once at install time, not by several ranks at once in the middle of a run.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: quickstart test lint install clean-quickstart

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Re-run the install only when the packaging changes.
$(STAMP): setup.py pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[train,dev]'
	$(BIN)/python -W ignore -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load(); \
	    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check launch megatron_code data_pipeline eval_harness tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The main job on the embedded default corpus (source already on this machine): a code tokenizer, a packed,
# deduplicated token store, a look inside it, then the tiny CodeGeeX-shaped model trained with TP=2 on 2 CPU
# ranks for 300 steps. Re-running reuses what is already built (the training resumes from its last checkpoint).
quickstart: $(STAMP)
	$(BIN)/codegeex data tokenizer --input default --output $(QS)/tokenizer --vocab-size 8000 \
	    --skip-existing max_input_mb_per_language=8
	$(BIN)/codegeex data build --input default --tokenizer $(QS)/tokenizer.model --output $(QS)/store \
	    --seq-len 512 --workers 2 max_input_mb_per_language=8
	$(BIN)/codegeex data inspect $(QS)/store --samples 2
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node 2 -m launch.cli train --config configs/train/tiny.yaml \
	    run_dir=$(QS)/train data.sources='[{path: $(QS)/store}]'
	@echo "quickstart: tokenizer $(QS)/tokenizer.model, token store $(QS)/store, training run $(QS)/train" \
	    "(metrics.jsonl, tensorboard/, checkpoints/latest)"

clean-quickstart:
	rm -rf $(QS)
