"""``codegeex data build``: inputs -> spooled documents (parallel, resumable) -> dedup -> packed Arrow shards.

Phase A (workers, or machines of a SLURM array with ``num_shards``/``shard_index``): each work unit is read,
filtered, parsed, hashed, checked for contamination and tokenized, and written to its own spool file under
``OUTPUT/.work/``; a unit whose spool exists is not done again, so a killed run resumes where it stopped.
Phase B (:func:`merge`, one process): exact and near duplicates are decided over all documents in input order,
the kept documents are packed and the shards and manifest are written. Units do not depend on the number of
workers and phase B reads them in order, so the shards are byte-identical whatever the parallelism.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, from_mapping, to_dict
from common.contracts import MANIFEST, CorruptInput, StoreError, StoreManifest, load_store_manifest, write_manifest
from common.io import write_json_atomic
from common.logs import progress
from data_pipeline.build_guard import build_lock, check_output
from data_pipeline.config import BuildConfig
from data_pipeline.corrupt import Corrupt, CorruptTally, corrupt_summary, describe_record, warn_corrupt
from data_pipeline.decontam import ContaminationIndex
from data_pipeline.dedup import MinHasher, content_hash
from data_pipeline.default_corpus import expand_inputs
from data_pipeline.documents import Document, accepted_documents
from data_pipeline.filters import SyntaxChecker
from data_pipeline.pairs import pair_tokens
from data_pipeline.redact import KINDS, Redactor, redact_documents
from data_pipeline.sources import Unit, enumerate_units
from data_pipeline.spool import merge_spools, spool_done, unit_stats, write_spool
from data_pipeline.tokenizer import CodeTokenizer, TextTokenizer, load_tokenizer, tokenizer_record

log = logging.getLogger(__name__)
WORK = ".work"



def spool_identity(cfg: BuildConfig, tokenizer: TextTokenizer) -> str:
    """Hash of everything that changes a spool: resuming with other settings is refused."""
    parts = {k: v for k, v in to_dict(cfg).items() if k in ("inputs", "unit_mb", "max_input_mb_per_language",
                                                            "fields", "filters", "redact", "dedup", "decontam",
                                                            "extract")}
    parts["tokenizer"] = tokenizer.fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class UnitProcessor:
    """Phase A for one unit. One instance per worker process (parsers and the tokenizer are built once)."""

    def __init__(self, cfg: BuildConfig, work: Path, contamination: ContaminationIndex | None) -> None:
        self.cfg, self.work = cfg, work
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.workers > 1:
            self.tokenizer.threads = 1  # the pool already uses every core
        self.checker = SyntaxChecker(cfg.filters.max_parse_error_fraction)
        self.minhash = MinHasher(cfg.dedup) if cfg.dedup.near else None
        self.contamination = contamination
        self.redactor = Redactor(cfg.redact) if cfg.redact.active() else None
        self.eod = self.tokenizer.eod_id

    def _tokens(self, docs: list[Document]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Token ids (tag line, text, end-of-document) and, for pairs, the per-token modality.

        Encoded about 1 MiB of text at a time, so a unit's token lists never all exist at once.
        """
        tok, dtype = self.tokenizer, self.tokenizer.token_dtype
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        start = 0
        while start < len(docs):
            end, size = start, 0
            while end < len(docs) and size < 1 << 20:
                size += len(docs[end].text)
                end += 1
            chunk = docs[start:end]
            whole = [i for i, d in enumerate(chunk) if d.pair is None]
            encoded = dict(zip(whole, tok.encode_arrays([chunk[i].text for i in whole])))
            for i, d in enumerate(chunk):
                out.append(self._document(d, encoded.get(i), dtype))
            start = end
        return out

    def _document(self, d: Document, ids: np.ndarray | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
        tok = self.tokenizer
        tag = tok.tag_ids(d.language)
        if d.pair is None:
            assert ids is not None
            arr = np.empty(len(tag) + len(ids) + 1, dtype=dtype)
            arr[:len(tag)] = tag
            arr[len(tag):-1] = ids
            arr[-1] = self.eod
            return arr, None
        return pair_tokens(tok, d, self.cfg.extract)

    def _without_reserved(self, docs: list[Document], skips: Counter[str]) -> list[Document]:
        """Documents holding a special token's text (``<|endoftext|>``, an added token) are skipped: their ids would
        end them early or decode to other text."""
        reserved = self.tokenizer.reserved_texts
        kept = [d for d in docs if not any(r in d.text for r in reserved)]
        if len(kept) < len(docs):
            skips["special_token_text"] += len(docs) - len(kept)
        return kept

    def __call__(self, unit: Unit) -> dict[str, Any]:
        skips: Counter[str] = Counter()
        corrupt: list[Corrupt] = []
        docs = list(accepted_documents(unit, self.cfg.fields, self.cfg.filters, self.cfg.extract, self.checker, skips,
                                       corrupt))
        docs = self._without_reserved(docs, skips)
        redactions: Counter[str] = Counter()
        if self.redactor is not None:  # before hashing, so documents differing only in a secret are duplicates
            self.redactor.counts = redactions
            docs = redact_documents(docs, self.redactor)
        tokens = self._tokens(docs)
        sigs = [self.minhash.signature(d.text) for d in docs] if self.minhash else None
        write_spool(
            self.work, unit.index, docs, tokens,
            hashes=[content_hash(d.text) for d in docs],
            signatures=sigs,
            band_keys=[self.minhash.band_keys(s) for s in sigs] if self.minhash and sigs is not None else None,
            contaminated=[self.contamination.match(d.text) if self.contamination else None for d in docs],
            token_dtype=self.tokenizer.token_dtype,
            stats={"unit": unit.index, "documents": len(docs), "skips": dict(skips),
                   "corrupt": _tally(corrupt).records(), "redactions": dict(redactions)},
        )
        return {"unit": unit.index, "documents": len(docs)}


def _tally(items: list[Corrupt]) -> CorruptTally:
    tally = CorruptTally()
    for item in items:
        tally.add(item)
    return tally


def corrupt_inputs(work: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The corrupt input files of the whole build (found listing the inputs, and reading every unit), per file,
    sorted by file name: the same whatever the unit size."""
    tally = CorruptTally(state.get("enumeration_corrupt", []))  # absent from the work folders of older builds
    for i in range(state["units"]):
        tally.merge(unit_stats(work, i).get("corrupt", []))
    return sorted(tally.records(), key=lambda r: str(r["file"]))


def redactions(work: Path, state: dict[str, Any], cfg: BuildConfig) -> dict[str, int]:
    """Replacements per kind over the documents the filters accepted (duplicates included); {} when it is off."""
    total: Counter[str] = Counter()
    for i in range(state["units"]):
        total.update(unit_stats(work, i).get("redactions", {}))
    return {k: int(total[k]) for k in KINDS if k in cfg.redact.active()}


_PROCESSOR: UnitProcessor | None = None


def _run_unit(unit: Unit) -> dict[str, Any]:
    if _PROCESSOR is None:
        raise RuntimeError("worker used before its UnitProcessor was created")
    return _PROCESSOR(unit)


def _init_worker(cfg: BuildConfig, work: Path, contamination: ContaminationIndex | None) -> None:
    global _PROCESSOR
    _PROCESSOR = UnitProcessor(cfg, work, contamination)


def prepare(cfg: BuildConfig) -> tuple[Path, list[Unit], dict[str, Any]]:
    """Enumerate the units and check (or write) the work directory's state."""
    out = Path(cfg.output)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_tokenizer_settings(cfg, tokenizer)
    corrupt: list[Corrupt] = []
    with progress(desc="list inputs", unit=" files") as bar:
        units, skips = enumerate_units(expand_inputs(cfg.inputs), int(cfg.unit_mb * 2**20), cfg.filters.max_file_bytes,
                                       int(cfg.max_input_mb_per_language * 2**20), on_file=lambda: bar.update(1),
                                       corrupt=corrupt)
    state = {"identity": spool_identity(cfg, tokenizer), "units": len(units), "enumeration_skips": dict(skips),
             "enumeration_corrupt": _tally(corrupt).records(),
             "tokenizer": to_dict(tokenizer_record(tokenizer))}
    state_file = work / "state.json"
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if old.get("identity") != state["identity"] or old.get("units") != state["units"]:
            raise ValueError(f"{out}: holds unfinished work from another configuration or input "
                             f"(identity {old.get('identity')} vs {state['identity']}); use another --output or delete {work}")
    else:
        write_json_atomic(state_file, state)
        write_json_atomic(work / "config.json", to_dict(cfg))
    return work, units, state


def check_tokenizer_settings(cfg: BuildConfig, tokenizer: TextTokenizer) -> None:
    """Settings that need a SentencePiece tokenizer are refused with another one, naming both."""
    if cfg.extract.normalize_whitespace and not isinstance(tokenizer, CodeTokenizer):
        raise ConfigError(f"extract.normalize_whitespace needs a tokenizer with [new_line]/[indent]/[dedent] pieces; "
                          f"{cfg.tokenizer} is a byte-level BPE with its own whitespace tokens (set it false)")


def run_phase_a(cfg: BuildConfig, work: Path, units: list[Unit]) -> None:
    """Spool every unit of this machine's part that is not spooled yet."""
    mine = [u for u in units if u.index % cfg.num_shards == cfg.shard_index and not spool_done(work, u.index)]
    done = sum(1 for u in units if u.index % cfg.num_shards == cfg.shard_index) - len(mine)
    if done:
        log.info("resuming: %d unit(s) already spooled, %d to go", done, len(mine))
    contamination = ContaminationIndex(cfg.decontam) if cfg.decontam.enabled else None
    if contamination is not None:
        log.info("decontamination: %d benchmark items indexed", contamination.num_items)
    if not mine:
        return
    bar = progress(total=len(mine), desc="read, filter, tokenize", unit="unit")
    if cfg.workers == 1:
        processor = UnitProcessor(cfg, work, contamination)
        for unit in mine:
            processor(unit)
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, work, contamination)) as pool:
            for _ in pool.imap_unordered(_run_unit, mine):
                bar.update(1)
    bar.close()


def up_to_date(cfg: BuildConfig) -> StoreManifest | None:
    """The manifest of a finished store built from the same inputs and settings, else None."""
    if not (Path(cfg.output) / MANIFEST).is_file():
        return None
    try:
        manifest = load_store_manifest(cfg.output)
    except StoreError as exc:  # another version or a damaged manifest: not this build's result, so build again
        log.warning("%s; building the store again", exc)
        return None
    identity = spool_identity(cfg, load_tokenizer(cfg.tokenizer))
    same_pack = manifest.config.get("pack") == to_dict(cfg)["pack"]
    return manifest if manifest.identity == identity and same_pack else None


def run_build(cfg: BuildConfig, command: list[str], force: bool = False) -> StoreManifest | None:
    """The whole build (or, with several shards, this machine's part of phase A), holding the output's build lock.
    Returns the manifest. An output holding anything else than this build's store is refused unless ``force``
    (:mod:`data_pipeline.build_guard`)."""
    with build_lock(Path(cfg.output), cfg.num_shards, cfg.shard_index):
        done = up_to_date(cfg)
        if done is not None:
            log.info("store %s is up to date (%d windows); nothing to do", cfg.output, done.total_windows)
            return done
        check_output(Path(cfg.output), force)
        return _build(cfg, command)


def _build(cfg: BuildConfig, command: list[str]) -> StoreManifest | None:
    work, units, state = prepare(cfg)
    log.info("%d work unit(s) from %d input(s); enumeration skipped %s", len(units), len(cfg.inputs),
             state["enumeration_skips"] or "nothing")
    run_phase_a(cfg, work, units)
    if cfg.num_shards > 1:
        log.info("part %d/%d spooled; after every part, run `codegeex data merge %s`", cfg.shard_index, cfg.num_shards,
                 cfg.output)
        return None
    return merge(cfg, command)


def merge(cfg: BuildConfig, command: list[str]) -> StoreManifest:
    """Phase B: decide duplicates over all spools, pack, write shards and the manifest."""
    out = Path(cfg.output)
    work = out / WORK
    state = json.loads((work / "state.json").read_text())
    missing = [i for i in range(state["units"]) if not spool_done(work, i)]
    if missing:
        raise ValueError(f"{out}: {len(missing)} unit(s) not spooled yet (first: {missing[:5]}); "
                         "run the remaining parts of `codegeex data build` first")
    manifest = merge_spools(cfg, work, state, progress)
    corrupt = corrupt_inputs(work, state)
    manifest.corrupt_inputs = [from_mapping(CorruptInput, r) for r in corrupt]
    manifest.redactions = redactions(work, state, cfg)
    warn_corrupt(corrupt)
    if manifest.total_windows == 0:
        skips = ", ".join(f"{k} {v}" for k, v in sorted(manifest.skips.items()) if v) or "no input file was found"
        named = "; ".join(describe_record(r) for r in corrupt[:10]) + ("; ..." if len(corrupt) > 10 else "")
        raise ValueError(f"{out}: nothing was accepted, so no store was written ({manifest.total_documents} "
                         f"documents kept; skipped: {skips}" + (f"; corrupt inputs: {named}" if corrupt else "")
                         + "); check --input and the filters")
    manifest.command = command
    manifest.config = to_dict(cfg)
    write_manifest(out, manifest)
    log_summary(manifest, out)
    if not cfg.keep_work:
        shutil.rmtree(work)
    return manifest


def log_summary(m: StoreManifest, out: Path) -> None:
    """One line per step with its counts."""
    skips = m.skips
    read = ("unreadable", "symlink_loop", "duplicate_directory", "not_a_training_language", "over_language_cap",
            "malformed_record")
    filtered = ("empty", "too_large", "binary", "invalid_utf8", "avg_line_too_long", "line_too_long", "parse_error")
    fmt = lambda keys: ", ".join(f"{k} {skips[k]:,}" for k in keys if skips.get(k)) or "none"  # noqa: E731
    corrupt = corrupt_summary([(c.file, c.items) for c in m.corrupt_inputs])
    log.info("read: skipped %s; corrupt inputs: %s", fmt(read), corrupt)
    log.info("filters: skipped %s", fmt(filtered))
    log.info("redaction: replaced %s", ", ".join(f"{k} {v:,}" for k, v in m.redactions.items()) or "nothing (off)")
    log.info("dedup and decontamination: dropped %s", fmt(("exact_duplicate", "near_duplicate", "contaminated")))
    log.info("tokenized: %s documents, %s tokens (%s)", f"{m.total_documents:,}", f"{m.total_tokens:,}",
             ", ".join(f"{k} {v.tokens:,}" for k, v in sorted(m.languages.items(), key=lambda kv: -kv[1].tokens)))
    log.info("packed: %s windows of %d tokens in %d shard(s), padding %.2f%%; store %s", f"{m.total_windows:,}",
             m.window, len(m.shards), 100 * m.padding_fraction, out)
