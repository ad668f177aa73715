"""Packaging for the CodeGeeX pre-training system: one distribution, five packages (a shared bottom layer and four stages), one command."""

from setuptools import find_packages, setup

setup(
    name="codegeex-train",
    version="0.1.0",
    description="Megatron-style pre-training, data pipeline and evaluation for CodeGeeX-shaped code models",
    python_requires=">=3.11",
    packages=find_packages(include=["common*", "launch*", "megatron_code*", "data_pipeline*", "eval_harness*"]),
    # the report's templates; the Hugging Face export's modeling files (copied into every export, not imported)
    package_data={"eval_harness": ["templates/*.j2"], "megatron_code": ["hf_template/*.py"]},
    install_requires=[
        "numpy>=1.26",
        "pyyaml>=6",
        "matplotlib>=3.8",
        "jinja2>=3.1",
        "tqdm>=4.60",
        "pyarrow>=15",
        "xxhash>=3.4",  # checkpoint file digests (common/integrity.py)
        "sentencepiece>=0.2",
        "tokenizers>=0.21",  # CodeGeeX's byte-level BPE (data_pipeline/bpe_tokenizer.py)
        "tree-sitter>=0.23",
        "tree-sitter-python",
        "tree-sitter-cpp",
        "tree-sitter-c",
        "tree-sitter-c-sharp",
        "tree-sitter-cuda",
        "tree-sitter-objc",
        "tree-sitter-java",
        "tree-sitter-scala",
        "tree-sitter-html",
        "tree-sitter-php",
        "tree-sitter-javascript",
        "tree-sitter-typescript",
        "tree-sitter-go",
        "tree-sitter-bash",
        "tree-sitter-rust",
        "tree-sitter-css",
        "tree-sitter-sql",
        "tree-sitter-kotlin",
        "tree-sitter-pascal",
        "tree-sitter-fortran",
    ],
    extras_require={
        # The trainer's stack; pinned to the releases that run on this project's machines.
        "train": ["torch==2.13.0", "megatron-core==0.16.1", "deepspeed==0.19.8", "safetensors>=0.4", "tensorboard", "psutil",
                  "wandb>=0.31"],  # log.wandb (offline mode needs no network; tests/test_observe.py reads its files)
        # `codegeex eval generate --backend hf` (and the native-vs-transformers benchmark); vLLM is left to GPU machines
        "hf": ["transformers>=4.56,<6"],
        # attention_backend 'flash' on CUDA machines (built against the installed torch: `pip install .[train]`
        # first, then `pip install --no-build-isolation .[gpu]`; it does not build without CUDA)
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "ruff>=0.6", "mypy>=1.10", "import-linter>=2.17", "types-PyYAML", "types-tqdm"],
    },
    entry_points={"console_scripts": ["codegeex=launch.cli:main"]},
)
