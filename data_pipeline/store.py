"""The token store: uncompressed Arrow IPC shards of packed windows, and a JSON manifest.

Layout::

    STORE/manifest.json            schema version, tokenizer fingerprint, shards with checksums, counts, command
    STORE/shards/shard-00000.arrow one record batch per ``batch_windows`` windows

Shard schema (``W = seq_len + 1``):

    tokens      fixed_size_list<uint16|uint32>[W]   token ids, padding after num_tokens
    doc_starts  list<int32>                         offsets where a document starts inside the window
    num_tokens  int32                               real tokens in the window
    language    uint8                               registry id (data_pipeline.languages)
    modality    fixed_size_list<uint8>[W]           optional: modality flags (packing.TEXT/PREFIX/CORRUPTIBLE)

Files are memory-mapped on read: a sample is a numpy view into the page cache, no copy. Checksums (SHA-256)
are verified when a store is opened; a truncated or corrupt shard is reported by name.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.contracts import MANIFEST, ShardEntry, StoreError, load_store_manifest
from common.io import file_sha256
from data_pipeline.packing import Window


def shard_schema(window: int, token_dtype: np.dtype, with_modality: bool) -> pa.Schema:
    fields = [
        pa.field("tokens", pa.list_(pa.from_numpy_dtype(token_dtype), window)),
        pa.field("doc_starts", pa.list_(pa.int32())),
        pa.field("num_tokens", pa.int32()),
        pa.field("language", pa.uint8()),
    ]
    if with_modality:
        fields.append(pa.field("modality", pa.list_(pa.uint8(), window)))
    return pa.schema(fields)


class ShardWriter:
    """Writes windows into shards of ``windows_per_shard``; each shard appears complete or not at all."""

    def __init__(self, out_dir: Path, window: int, token_dtype: np.dtype, with_modality: bool,
                 windows_per_shard: int, batch_windows: int = 1024) -> None:
        self.dir = out_dir / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.window, self.token_dtype, self.with_modality = window, np.dtype(token_dtype), with_modality
        self.schema = shard_schema(window, self.token_dtype, with_modality)
        self.windows_per_shard, self.batch_windows = windows_per_shard, batch_windows
        self.shards: list[ShardEntry] = []
        self._batch: list[Window] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._in_shard = 0

    def add(self, w: Window) -> None:
        self._batch.append(w)
        if len(self._batch) >= self.batch_windows or self._in_shard + len(self._batch) >= self.windows_per_shard:
            self._write_batch()

    def _write_batch(self) -> None:
        if not self._batch:
            return
        if self._writer is None:
            self._tmp = self.dir / f"shard-{len(self.shards):05d}.arrow.tmp"
            self._writer = pa.ipc.new_file(str(self._tmp), self.schema)
        n = len(self._batch)
        tokens = np.stack([w.tokens for w in self._batch]).astype(self.token_dtype).reshape(-1)
        cols = [
            pa.FixedSizeListArray.from_arrays(pa.array(tokens), self.window),
            pa.array([list(w.doc_starts) for w in self._batch], type=pa.list_(pa.int32())),
            pa.array([w.num_tokens for w in self._batch], type=pa.int32()),
            pa.array([w.language for w in self._batch], type=pa.uint8()),
        ]
        if self.with_modality:
            mod = np.stack([w.modality for w in self._batch]).astype(np.uint8).reshape(-1)  # type: ignore[misc]
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(mod), self.window))
        self._writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self.schema))
        self._in_shard += n
        self._batch = []
        if self._in_shard >= self.windows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None
        self._writer.close()
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self.shards.append(ShardEntry(file=f"shards/{final.name}", windows=self._in_shard,
                                      bytes=final.stat().st_size, sha256=file_sha256(final)))
        self._writer, self._in_shard = None, 0

    def close(self) -> list[ShardEntry]:
        self._write_batch()
        if self._writer is not None:
            self._close_shard()
        keep = {Path(s.file).name for s in self.shards}
        for stale in self.dir.glob("shard-*.arrow*"):  # left by an earlier, interrupted run
            if stale.name not in keep:
                stale.unlink()
        return self.shards


@dataclass
class Sample:
    """One window read from a store (views into the memory map, not copies)."""

    tokens: np.ndarray  # (W,)
    doc_starts: np.ndarray  # (D,) int32
    num_tokens: int
    language: int
    modality: np.ndarray | None  # (W,) uint8 or None


class TokenStore:
    """Random access to the windows of a store, memory-mapped."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = load_store_manifest(self.path)
        self.window = self.manifest.window
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._starts: list[int] = []
        total = 0
        for shard in self.manifest.shards:
            f = self.path / shard.file
            if not f.is_file():
                raise StoreError(f"{f}: shard listed in the manifest is missing")
            if f.stat().st_size != shard.bytes:
                raise StoreError(f"{f}: shard is truncated or changed ({f.stat().st_size} bytes, manifest says {shard.bytes})")
            if verify and file_sha256(f) != shard.sha256:
                raise StoreError(f"{f}: checksum mismatch, the shard is corrupt")
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(f), "r"))
                batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            except pa.ArrowInvalid as exc:
                raise StoreError(f"{f}: not a readable Arrow IPC file ({exc})") from None
            for b in batches:
                self._starts.append(total)
                total += b.num_rows
                self._chunks.append(self._views(b))
        self._len = total
        if total != self.manifest.total_windows:
            raise StoreError(f"{self.path / MANIFEST}: shards hold {total} windows, manifest says {self.manifest.total_windows}")
        self.languages = np.concatenate([c[4] for c in self._chunks]) if self._chunks else np.zeros(0, np.uint8)

    def _views(self, b: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        tokens = b.column("tokens").values.to_numpy(zero_copy_only=True).reshape(-1, self.window)
        starts = b.column("doc_starts")
        offsets = starts.offsets.to_numpy(zero_copy_only=True)
        values = starts.values.to_numpy(zero_copy_only=True)
        num = b.column("num_tokens").to_numpy(zero_copy_only=True)
        lang = b.column("language").to_numpy(zero_copy_only=True)
        mod = None
        if "modality" in b.schema.names:
            mod = b.column("modality").values.to_numpy(zero_copy_only=True).reshape(-1, self.window)
        return tokens, offsets, values, num, lang, mod

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range for a store of {self._len}")
        c = bisect.bisect_right(self._starts, i) - 1
        tokens, offsets, values, num, lang, mod = self._chunks[c]
        r = i - self._starts[c]
        return Sample(tokens[r], values[offsets[r]:offsets[r + 1]], int(num[r]), int(lang[r]),
                      None if mod is None else mod[r])

