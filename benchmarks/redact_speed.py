"""Redaction speed and false-positive rate on the embedded default corpus (issue 18, point 5).

``flock /tmp/bench.lock .venv/bin/python -m benchmarks.redact_speed [MB_PER_LANGUAGE]`` reads the documents the
build's filters accept from ``--input default`` (at most MB_PER_LANGUAGE MiB of files per language, default 8), then
times :class:`data_pipeline.redact.Redactor` over them in this one process (MB/s per core), and reports how many
documents and matches each kind changes, with a sample of the changed lines to inspect by eye.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from data_pipeline.default_corpus import expand_inputs
from data_pipeline.documents import accepted_documents
from data_pipeline.extract import ExtractConfig
from data_pipeline.filters import FilterConfig, SyntaxChecker
from data_pipeline.redact import KINDS, RedactConfig, Redactor
from data_pipeline.sources import RecordFields, enumerate_units


def default_texts(mb_per_language: float) -> list[tuple[str, str, str]]:
    """(source, language, text) of the default corpus's accepted documents (no syntax check: faster, and the
    redactor sees text only)."""
    filters = FilterConfig(parse=False)
    units, _ = enumerate_units(expand_inputs(["default"]), 4 << 20, filters.max_file_bytes,
                               int(mb_per_language * 2**20))
    skips: Counter[str] = Counter()
    return [(d.source, d.language.name, d.text) for u in units
            for d in accepted_documents(u, RecordFields(), filters, ExtractConfig(), SyntaxChecker(), skips)]


def changes(texts: list[tuple[str, str, str]]) -> tuple[Counter[str], Counter[str], list[tuple[str, str, str]]]:
    """Per kind: documents changed and matches; and (kind, source, first changed line) for each changed document."""
    docs: Counter[str] = Counter()
    matches: Counter[str] = Counter()
    sample: list[tuple[str, str, str]] = []
    for source, _lang, text in texts:
        for kind in KINDS:
            one = Redactor(RedactConfig(**{f: f == _SWITCH[kind] for f in _SWITCH.values()}))
            out = one(text)
            if out != text:
                docs[kind] += 1
                matches[kind] += one.counts[kind]
                line = next(b for a, b in zip(text.splitlines(), out.splitlines()) if a != b)
                sample.append((kind, source, line.strip()[:120]))
    return docs, matches, sample


_SWITCH = {"private_key": "private_keys", "api_key": "api_keys", "password": "passwords", "email": "emails",
           "ip_address": "ip_addresses"}


def main(argv: list[str]) -> None:
    texts = default_texts(float(argv[0]) if argv else 8.0)
    size = sum(len(t.encode()) for _, _, t in texts)
    redactor = Redactor(RedactConfig())
    start = time.perf_counter()
    for _, _, text in texts:
        redactor(text)
    seconds = time.perf_counter() - start
    docs, matches, sample = changes(texts)
    print(f"default corpus: {len(texts):,} documents, {size / 2**20:.1f} MiB; redaction {size / 2**20 / seconds:.1f} "
          f"MiB/s on one core ({seconds:.2f} s)")
    for kind in KINDS:
        print(f"  {kind:12s} {docs[kind]:6,} documents ({100 * docs[kind] / len(texts):.2f}%), {matches[kind]:,} matches")
    for kind, source, line in sample[:: max(1, len(sample) // 40)]:
        print(f"  [{kind}] {source}: {line}")


if __name__ == "__main__":
    main(sys.argv[1:])
