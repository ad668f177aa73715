"""``codegeex data tokenizer``: train the code SentencePiece model on the accepted files of a corpus."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from common.logs import progress
from data_pipeline.config import TokenizerConfig
from data_pipeline.default_corpus import expand_inputs
from data_pipeline.documents import accepted_documents
from data_pipeline.extract import ExtractConfig
from data_pipeline.filters import SyntaxChecker
from data_pipeline.sources import enumerate_units
from data_pipeline.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


def training_texts(cfg: TokenizerConfig, counts: Counter[str]) -> Iterator[str]:
    """Accepted whole files in input order, up to ``max_train_mb``; ``counts`` gets per-language files and skips."""
    units, skips = enumerate_units(expand_inputs(cfg.inputs), 4 << 20, cfg.filters.max_file_bytes,
                                   int(cfg.max_input_mb_per_language * 2**20))
    counts.update({f"skip:{k}": v for k, v in skips.items()})
    budget = int(cfg.max_train_mb * 2**20)
    checker = SyntaxChecker(cfg.filters.max_parse_error_fraction)
    unit_skips: Counter[str] = Counter()
    with progress(desc="read files for the tokenizer", unit=" files") as bar:
        for unit in units:
            for doc in accepted_documents(unit, cfg.fields, cfg.filters, ExtractConfig(), checker, unit_skips):
                size = len(doc.text.encode("utf-8"))
                if size > budget:
                    counts.update({f"skip:{k}": v for k, v in unit_skips.items()})
                    return
                budget -= size
                counts[doc.language.name] += 1
                bar.update(1)
                yield doc.text
    counts.update({f"skip:{k}": v for k, v in unit_skips.items()})


def run_tokenizer(cfg: TokenizerConfig) -> Path:
    counts: Counter[str] = Counter()
    max_bytes = cfg.filters.max_file_bytes + 1024
    model = train_tokenizer(training_texts(cfg, counts), cfg.output, cfg.vocab_size, cfg.model_type,
                            max_sentence_bytes=max_bytes, num_threads=cfg.threads)
    files = {k: v for k, v in counts.items() if not k.startswith("skip:")}
    log.info("tokenizer %s: vocabulary %d, trained on %d files (%s)", model, cfg.vocab_size, sum(files.values()),
             ", ".join(f"{k} {v}" for k, v in sorted(files.items(), key=lambda kv: -kv[1])))
    return model
