"""Configuration of the data jobs: ``codegeex data build`` and ``codegeex data tokenizer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import option
from data_pipeline.decontam import DecontamConfig
from data_pipeline.dedup import DedupConfig
from data_pipeline.extract import ExtractConfig
from data_pipeline.filters import FilterConfig
from data_pipeline.redact import RedactConfig
from data_pipeline.sources import RecordFields


@dataclass
class PackConfig:
    """How documents become windows."""

    seq_len: int = option(2048, "tokens a sample trains on; windows hold seq_len + 1 tokens (inputs and shifted labels)")
    mode: Literal["concat", "best_fit"] = option("concat", "concat: cut documents at window edges; best_fit: "
                                                  "cut only documents longer than a window, pad the rest")
    open_windows: int = option(8, "best_fit: windows kept open for first-fit")
    shard_mb: float = option(256.0, "target size of one shard file in MiB")

    def validate(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"pack.seq_len ({self.seq_len}) must be at least 8")
        if self.shard_mb <= 0:
            raise ValueError(f"pack.shard_mb ({self.shard_mb}) must be positive")


@dataclass
class BuildConfig:
    """``codegeex data build``: source trees to a token store."""

    inputs: list[str] = option([], "directories, files, .zip, .jsonl(.gz) or .parquet; 'default' is the "
                                   "embedded corpus of source already on the machine")
    tokenizer: str = option("", "the tokenizer: a SentencePiece .model (from `codegeex data tokenizer`) or a "
                            "byte-level BPE directory (vocab.json, merges.txt: CodeGeeX-13B's)")
    output: str = option("", "the store directory to write")
    workers: int = option(1, "worker processes for reading, filtering, parsing and tokenizing")
    unit_mb: float = option(4.0, "input per work unit in MiB; fixes the unit boundaries, not the worker count")
    max_input_mb_per_language: float = option(0.0, "read at most this many MiB of files per language (0: no cap)")
    num_shards: int = option(1, "split the work across this many machines (a SLURM array); merge afterwards")
    shard_index: int = option(0, "this machine's part, 0 <= shard_index < num_shards")
    keep_work: bool = option(False, "keep the per-unit spools in OUTPUT/.work after the store is written")
    fields: RecordFields = option(RecordFields, "field names in .jsonl and Parquet records")
    filters: FilterConfig = option(FilterConfig, "per-document filters")
    redact: RedactConfig = option(RedactConfig, "redaction of e-mails, IP addresses and secrets (after the filters, "
                                  "before dedup, decontamination and tokenizing)")
    dedup: DedupConfig = option(DedupConfig, "exact and near deduplication")
    decontam: DecontamConfig = option(DecontamConfig, "decontamination against benchmarks")
    extract: ExtractConfig = option(ExtractConfig, "function-level extraction and comment removal")
    pack: PackConfig = option(PackConfig, "packing into windows")

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one input (--input PATH or 'default')")
        if not self.tokenizer:
            raise ValueError("tokenizer: give the SentencePiece model (--tokenizer MODEL)")
        if not self.output:
            raise ValueError("output: give the store directory (--output DIR)")
        if self.workers < 1:
            raise ValueError(f"workers ({self.workers}) must be at least 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index ({self.shard_index}) must be in [0, num_shards ({self.num_shards}))")
        if self.unit_mb <= 0:
            raise ValueError(f"unit_mb ({self.unit_mb}) must be positive")


@dataclass
class TokenizerConfig:
    """``codegeex data tokenizer``: train the code SentencePiece model."""

    inputs: list[str] = option([], "as for `data build`; 'default' is the embedded corpus")
    output: str = option("", "output prefix: writes PREFIX.model and PREFIX.vocab")
    vocab_size: int = option(32000, "vocabulary size (CodeGeeX pads its 50k-odd vocabulary to 52224 in the model)")
    model_type: Literal["bpe", "unigram"] = option("bpe", "SentencePiece model type")
    max_train_mb: float = option(256.0, "train on at most this many MiB of accepted files (taken in input order)")
    max_input_mb_per_language: float = option(0.0, "read at most this many MiB of files per language (0: no cap)")
    threads: int = option(2, "SentencePiece trainer threads")
    fields: RecordFields = option(RecordFields, "field names in .jsonl and Parquet records")
    filters: FilterConfig = option(FilterConfig, "the same filters as `data build`, so it trains on what it will encode")

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one input (--input PATH or 'default')")
        if not self.output:
            raise ValueError("output: give the output prefix (--output PREFIX)")
        if self.vocab_size < 512:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be at least 512 (256 byte pieces plus specials)")
