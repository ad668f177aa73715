# Two entry points: `make quickstart` and `make test`. Everything they need is installed here, so a fresh
# machine (or CI's clean clone) needs nothing done by hand.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QS ?= runs/quickstart
HUMANEVAL_X ?= ../shared/humaneval-x
PIP := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The trainer needs no DeepSpeed op compiled (torch's fused AdamW; DeepSpeed's CPU shared-memory all-reduce is
# switched off, megatron_code/deepspeed_glue.py); should DeepSpeed ever compile one, it lands with the environment.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

# Debian packages the launcher tests (a real SLURM), the evaluation sandbox and runners, and the report's browser
# test (headless chromium) need.
SYSTEM_PACKAGES := slurm-wlm munge bubblewrap golang-go golang-github-stretchr-testify-dev libboost-dev libssl-dev chromium
SYSTEM_STAMP := $(VENV)/.system

.PHONY: quickstart test lint install system clean-quickstart modality mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Re-run the install only when the packaging changes.
$(STAMP): setup.py pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[train,dev,hf]'
	touch $(STAMP)

install: $(STAMP)

# Installed with apt-get when run as root; otherwise the tests that need them skip, saying so.
$(SYSTEM_STAMP): | $(BIN)/python
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	else echo "make: system packages missing ($$missing) and not root: the tests that need them will skip"; fi
	touch $(SYSTEM_STAMP)

system: $(SYSTEM_STAMP) $(VENV)/node/node_modules/js-md5

# HumanEval-X JavaScript/162 needs js-md5; the sandboxed node finds it through NODE_PATH.
$(VENV)/node/node_modules/js-md5: | $(BIN)/python
	@if command -v npm >/dev/null; then npm install --silent --prefix $(VENV)/node js-md5; \
	else echo "make: npm missing: the one HumanEval-X JavaScript task that needs js-md5 will fail"; fi

lint: $(STAMP)
	$(BIN)/ruff check common launch megatron_code data_pipeline eval_harness tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint system
	$(BIN)/python -m pytest -q

# Mutation testing, not part of `make test` (docs/benchmarks.md, "Mutation testing"): mutmut mutates the modules that
# pyproject.toml's [tool.mutmut] names, one change per mutant in a copy under mutants/, runs the tests that reach each
# one, and lists the mutants no test kills. About 15 minutes on 2 cores.
mutation: $(STAMP)
	$(PIP) install -q 'mutmut==3.8.1'
	CODEGEEX_SHARED=$(abspath ../shared) $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

# The main job on the embedded default corpus (source already on this machine): a code tokenizer, a packed,
# deduplicated token store, a look inside it, the tiny CodeGeeX-shaped model trained with TP=2 on 2 CPU ranks for 300
# steps, then its checkpoint reloaded to generate HumanEval-X samples in five languages, executed in the sandbox and
# scored into a report. Re-running reuses what is already built (training resumes, generation and execution add only
# what is missing).
QS_PROBLEMS ?= 20
QS_N ?= 2
quickstart: $(STAMP) system
	$(BIN)/codegeex data tokenizer --input default --output $(QS)/tokenizer --vocab-size 8000 \
	    --skip-existing max_input_mb_per_language=8
	$(BIN)/codegeex data build --input default --tokenizer $(QS)/tokenizer.model --output $(QS)/store \
	    --seq-len 512 --workers 2 max_input_mb_per_language=8
	$(BIN)/codegeex data inspect $(QS)/store --samples 2
	$(BIN)/codegeex launch local --nproc 2 configs/train/tiny.yaml run_dir=$(QS)/train \
	    data.sources='[{path: $(QS)/store}]'
	@if [ ! -d "$(HUMANEVAL_X)" ]; then echo "quickstart: $(HUMANEVAL_X) not found: evaluation skipped" \
	    "(HUMANEVAL_X=DIR)"; exit 0; fi; set -e; \
	$(BIN)/codegeex eval generate --checkpoint $(QS)/train --data $(HUMANEVAL_X) --languages all \
	    --problems $(QS_PROBLEMS) --n $(QS_N) --temperature 0.8 --max-new-tokens 128 --batch-size 40 \
	    --output $(QS)/eval/samples.jsonl; \
	$(BIN)/codegeex eval execute $(QS)/eval/samples.jsonl --data $(HUMANEVAL_X) --output $(QS)/eval/results.jsonl; \
	$(BIN)/codegeex eval report $(QS)/eval/results.jsonl --output $(QS)/eval/report
	@echo "quickstart: tokenizer $(QS)/tokenizer.model | token store $(QS)/store | training run $(QS)/train" \
	    "(metrics.jsonl, tensorboard/, checkpoints/latest) | samples and results $(QS)/eval | report" \
	    "$(QS)/eval/report/report.md and report.html"

clean-quickstart:
	rm -rf $(QS)

# Modality-relative pre-training on the tiny preset (docs/modality.md): text-to-code pairs from the embedded default
# corpus (whitespace markers on), stage 1 modality-agnostic (text-code-clm), stage 2 from it with separated
# embeddings (SEPARATION) and OBJECTIVE, then both scored on HumanEval-X Python with incremental pass@k (greedy).
MR ?= runs/modality
SEPARATION ?= full
OBJECTIVE ?= corrupt-code-clm
modality: $(STAMP)
	$(BIN)/codegeex data tokenizer --input default --output $(QS)/tokenizer --vocab-size 8000 \
	    --skip-existing max_input_mb_per_language=8
	$(BIN)/codegeex data build --input default --tokenizer $(QS)/tokenizer.model --output $(MR)/pairs \
	    --seq-len 256 --workers 2 max_input_mb_per_language=8 extract.functions=true extract.keep_files=false \
	    extract.normalize_whitespace=true pack.mode=best_fit
	$(BIN)/codegeex launch local --nproc 2 configs/train/modality-stage1.yaml run_dir=$(MR)/stage1 \
	    data.sources='[{path: $(MR)/pairs}]'
	$(BIN)/codegeex launch local --nproc 2 configs/train/mrpt.yaml run_dir=$(MR)/stage2 init_from=$(MR)/stage1 \
	    data.sources='[{path: $(MR)/pairs}]' model.embedding_separation=$(SEPARATION) objective.name=$(OBJECTIVE) \
	    optim.lr=1e-3 optim.min_lr=1e-4
	@if [ ! -d "$(HUMANEVAL_X)" ]; then echo "modality: $(HUMANEVAL_X) not found: scoring skipped (HUMANEVAL_X=DIR)"; \
	    exit 0; fi; \
	for stage in stage1 stage2; do \
	    $(BIN)/codegeex eval generate --checkpoint $(MR)/$$stage/checkpoints/$$(cat $(MR)/$$stage/checkpoints/latest) \
	        --data $(HUMANEVAL_X) --languages python --task incremental --greedy --n 1 --max-new-tokens 96 \
	        --batch-size 32 --output $(MR)/eval/$$stage/samples.jsonl || exit 1; \
	    $(BIN)/codegeex eval execute $(MR)/eval/$$stage/samples.jsonl --data $(HUMANEVAL_X) \
	        --output $(MR)/eval/$$stage/results.jsonl || exit 1; \
	done; \
	$(BIN)/codegeex eval report $(MR)/eval/stage1/results.jsonl $(MR)/eval/stage2/results.jsonl \
	    --output $(MR)/eval/report && echo "modality: pairs $(MR)/pairs, runs $(MR)/stage1 $(MR)/stage2," \
	    "report $(MR)/eval/report/report.md"
