"""The contracts between stages: the token store's manifest and the checkpoint's manifest, as typed dataclasses.

Each is written by one stage and read by the next ones, always through the classes here: :func:`load_store_manifest`
and :func:`load_checkpoint_manifest` are the only readers, :func:`write_manifest` the only writer. A missing or
wrong field is reported naming the file and the field (``STORE/manifest.json: tokenizer.vocab_size: expected an
integer, got 'x'``); a format version this code does not read is refused by name, and older versions that it can
read are upgraded on load.

A training checkpoint (``ROOT/step-N/``) also lists every one of its files in ``files.json``
(:class:`CheckpointFiles`, read by :func:`load_checkpoint_files`).

Store manifest versions:
    1  the pair layout (order, whitespace markers) only inside the build's own ``config.extract``;
    2  (current) a ``pairs`` section of its own, None for stores without text-to-code pairs. Stores built since
       corrupt inputs are named also list them (``corrupt_inputs``); in older ones the list is empty.

Checkpoint manifest versions:
    1  (current) model config, TP size, step, tensor specs, git revision; tokenizer, pair layout and objective
       when the trainer knew them; since issue 17 every file's size and digest (``files``, empty in older ones). The tokenizer's path is relative to the checkpoint directory (which holds a copy
       of it) in checkpoints written since they carry it; older ones recorded it absolute or relative to the
       directory training ran in, and are still read (:meth:`CheckpointManifest.tokenizer_path`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from common.config import ConfigError, from_mapping, to_dict
from common.integrity import FileRecord
from common.io import file_sha256, write_json_atomic

# the files that make a byte-level BPE tokenizer directory's identity (CodeGeeX's release); the configs beside them
# (tokenizer_config.json, special_tokens_map.json) are carried but do not change a single id
BPE_FILES = ("vocab.json", "merges.txt", "added_tokens.json")
BPE_CARRIED = BPE_FILES + ("tokenizer_config.json", "special_tokens_map.json")

MANIFEST = "manifest.json"
STORE_FORMAT = "codegeex-token-store"
STORE_SCHEMA_VERSION = 2
CHECKPOINT_FORMAT = "codegeex-checkpoint"
CHECKPOINT_SCHEMA_VERSION = 1
CHECKPOINT_FILES = "files.json"  # a training checkpoint's file list (CheckpointFiles)
CHECKPOINT_FILES_FORMAT = "codegeex-checkpoint-files"
CHECKPOINT_FILES_SCHEMA_VERSION = 1

M = TypeVar("M")
log = logging.getLogger("codegeex.checkpoint")


class ManifestError(ValueError):
    """A manifest is missing a field, has a wrong one, or is of another format or version; the message names the
    file and the field."""


class StoreError(ManifestError):
    """A store is missing, incomplete, corrupt or of another format; the message names the file."""


def tokenizer_sha256(path: str | Path) -> str:
    """A tokenizer's fingerprint: the sha256 of a SentencePiece ``.model`` file, or of a BPE directory's
    :data:`BPE_FILES` (each name, a NUL, its bytes, a NUL; a missing ``added_tokens.json`` left out)."""
    p = Path(path)
    if not p.is_dir():
        return file_sha256(p)
    digest = hashlib.sha256()
    for name in BPE_FILES:
        file = p / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(kw_only=True)
class TokenizerRecord:
    """The tokenizer a store was built with (and a checkpoint trained on): where it was, its fingerprint, its ids."""

    path: str = ""
    sha256: str = ""
    vocab_size: int = 0
    eod_id: int = -1
    pad_id: int = -1
    eod: str = ""
    token_dtype: str = ""
    mask_id: int = -1  # -1: no [MASK] piece recorded (stores built before corrupt-code-clm existed)
    # the ids the pipeline itself inserts ([MASK] and PanGu-Coder's markers): rows a released model never trained,
    # set to the mean trained row when training starts from a converted checkpoint (empty in older stores)
    marker_ids: list[int] = field(default_factory=list)

    def candidates(self, base: str | Path | None = None) -> list[Path]:
        """Where the recorded file (or BPE directory) may be, in order: relative to ``base`` (a checkpoint directory), as recorded
        (absolute, or relative to the working directory)."""
        path = Path(self.path)
        return [path] if path.is_absolute() or not base else [Path(base) / path, path]

    def locate(self, base: str | Path | None = None) -> Path:
        """The recorded file (see :meth:`candidates`); found only relative to the working directory although a
        ``base`` was given (a checkpoint from before they carried their tokenizer), with a warning."""
        looked = self.candidates(base)
        for i, path in enumerate(looked):
            if path.is_file() or path.is_dir():
                if base and i > 0 and not path.is_absolute():
                    log.warning("%s: tokenizer %s found relative to the working directory (%s), not in the checkpoint "
                                "(written before checkpoints carried it); convert the checkpoint to carry it",
                                base, self.path, Path.cwd())
                return path
        raise FileNotFoundError(f"{base or 'the checkpoint'}: the tokenizer it records ({self.path}) is not there "
                                f"(looked at {', '.join(str(p) for p in looked)}); pass --tokenizer MODEL")

    def verify(self, path: str | Path, where: str | Path = "") -> None:
        """Refuse ``path`` when a fingerprint is recorded and its bytes hash to another one (:func:`tokenizer_sha256`)."""
        if self.sha256:
            got = tokenizer_sha256(path)
            if got != self.sha256:
                raise ValueError(f"{where or 'the checkpoint'}: tokenizer {path} has sha256 {got}, the checkpoint "
                                 f"records {self.sha256} (not the tokenizer it was trained with); pass --tokenizer "
                                 "MODEL to use another one anyway")


@dataclass(kw_only=True, frozen=True)
class PairLayout:
    """How text-to-code pairs are laid out in a store, and so how a checkpoint trained on them is prompted."""

    order: Literal["docstring_first", "signature_first"] = "docstring_first"
    normalize_whitespace: bool = False


@dataclass(kw_only=True)
class ShardEntry:
    file: str  # relative to the store, e.g. shards/shard-00000.arrow
    windows: int
    bytes: int
    sha256: str


@dataclass(kw_only=True)
class LanguageCounts:
    documents: int = 0
    pairs: int = 0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0


@dataclass(kw_only=True)
class CorruptInput:
    """An input file the build could not read whole: its unreadable or malformed items were skipped."""

    file: str  # the input file (the archive or record file; ``archive.zip!member`` for a member not UTF-8)
    items: int  # items skipped: the whole file (1), members, records, or the rows of a row group
    reasons: dict[str, int]  # the skip reasons they are counted under (unreadable, malformed_record, invalid_utf8)
    first: str  # where and why the first one failed, e.g. "line 3: invalid JSON (JSONDecodeError: ...)"


@dataclass(kw_only=True)
class StoreManifest:
    """``STORE/manifest.json``: what ``codegeex data build`` wrote and the sampler, trainer and inspector read."""

    format: str = STORE_FORMAT
    schema_version: int = STORE_SCHEMA_VERSION
    seq_len: int
    window: int  # seq_len + 1 tokens per stored window (inputs and the shifted labels)
    token_dtype: str
    columns: list[str]
    pack_mode: str = "concat"
    tokenizer: TokenizerRecord
    pairs: PairLayout | None = None  # None: no text-to-code pairs (no modality column)
    total_windows: int
    total_documents: int = 0
    total_tokens: int = 0
    padding_fraction: float = 0.0
    languages: dict[str, LanguageCounts] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)
    corrupt_inputs: list[CorruptInput] = field(default_factory=list)  # sorted by file; counted in ``skips`` too
    redactions: dict[str, int] = field(default_factory=dict)  # replacements per kind (data_pipeline.redact.KINDS)
    dedup: dict[str, Any] = field(default_factory=dict)
    contaminated_examples: list[dict[str, str]] = field(default_factory=list)
    shards: list[ShardEntry]
    identity: str = ""  # what the build's inputs and settings hash to (an up-to-date store is not rebuilt)
    command: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the build's own configuration: provenance only

    def validate(self) -> None:
        if self.window != self.seq_len + 1:
            raise ValueError(f"window ({self.window}) must be seq_len + 1 ({self.seq_len + 1})")
        if self.tokenizer.vocab_size <= 0:
            raise ValueError(f"tokenizer.vocab_size ({self.tokenizer.vocab_size}) must be positive")
        if self.has_modality != (self.pairs is not None):
            raise ValueError(f"pairs ({self.pairs}) must be given exactly when the columns have modality "
                             f"({self.columns})")

    @property
    def has_modality(self) -> bool:
        """Whether windows carry per-token modality flags (stores of text-to-code pairs)."""
        return "modality" in self.columns


@dataclass(kw_only=True)
class TensorSpec:
    shape: list[int]  # the full (unsplit) shape
    partition_dim: int | None  # the dimension split across tensor-parallel ranks; None: replicated


@dataclass(kw_only=True)
class CheckpointManifest:
    """``CHECKPOINT/manifest.json``: everything generation and evaluation need beside the tensors."""

    format: str = CHECKPOINT_FORMAT
    schema_version: int = CHECKPOINT_SCHEMA_VERSION
    model: dict[str, Any]  # the model configuration (megatron_code.config.ModelConfig as plain data)
    tp_size: int
    step: int = 0
    git_revision: str = "unknown"
    tensors: dict[str, TensorSpec]
    tokenizer: TokenizerRecord | None = None
    pairs: PairLayout | None = None  # the pair layout it was trained on, None for plain code
    objective: str | None = None
    converted_from: str | None = None
    # every file of the directory but manifest.json (shards, tokenizer) with its size and digest; empty in
    # checkpoints written before they carried checksums (then nothing is verified, with a warning)
    files: dict[str, FileRecord] = field(default_factory=dict)

    def validate(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size ({self.tp_size}) must be at least 1")

    def tokenizer_path(self, override: str | Path | None = None, where: str | Path = "") -> str:
        """The tokenizer to decode with: ``override`` when given (as it is); else the one recorded, looked for
        relative to ``where`` (the checkpoint directory), as an absolute path, then relative to the working
        directory (older checkpoints), and checked against its recorded sha256."""
        if override:
            return str(override)
        if self.tokenizer is None or not self.tokenizer.path:
            raise ValueError(f"{where or 'the checkpoint'}: the checkpoint names no tokenizer; pass --tokenizer MODEL")
        path = self.tokenizer.locate(where or None)
        self.tokenizer.verify(path, where)
        return str(path)


@dataclass(kw_only=True)
class CheckpointFiles:
    """``ROOT/step-N/files.json``: every file of a training checkpoint (model, DeepSpeed state, optimizer state,
    RNG, trainer.json) with its size and digest, written last before the step directory is renamed into place."""

    format: str = CHECKPOINT_FILES_FORMAT
    schema_version: int = CHECKPOINT_FILES_SCHEMA_VERSION
    step: int
    files: dict[str, FileRecord]


def _upgrade_store(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: the pair layout moves out of the build's configuration into its own section."""
    data = dict(data)
    if data.get("schema_version") == 1:
        config = data.get("config")
        extract = config.get("extract") if isinstance(config, dict) else None
        extract = extract if isinstance(extract, dict) else {}
        columns = data.get("columns")
        data["pairs"] = ({"order": extract.get("pair_order", "docstring_first"),
                          "normalize_whitespace": extract.get("normalize_whitespace", False)}
                         if isinstance(columns, list) and "modality" in columns else None)
        data["schema_version"] = 2
    return data


_KINDS: dict[type, tuple[str, int, tuple[int, ...], Any]] = {
    # class: (format, current version, older versions read, upgrade)
    StoreManifest: (STORE_FORMAT, STORE_SCHEMA_VERSION, (1,), _upgrade_store),
    CheckpointManifest: (CHECKPOINT_FORMAT, CHECKPOINT_SCHEMA_VERSION, (), lambda d: d),
    CheckpointFiles: (CHECKPOINT_FILES_FORMAT, CHECKPOINT_FILES_SCHEMA_VERSION, (), lambda d: d),
}


def manifest_from_json(cls: type[M], data: Any, source: str | Path) -> M:
    """Check ``data`` (a parsed manifest) against ``cls``: format, version, every field's presence and type."""
    fmt, version, older, upgrade = _KINDS[cls]
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt:
        raise ManifestError(f"{source}: format {data.get('format')!r} is not {fmt!r}")
    got = data.get("schema_version")
    if got != version and got not in older:
        readable = ", ".join(str(v) for v in (*older, version))
        raise ManifestError(f"{source}: schema_version {got!r} is not one this code reads ({readable}); "
                            + ("it is newer: update the code" if isinstance(got, int) and got > version else
                               "rebuild it with this version"))
    try:
        return from_mapping(cls, upgrade(data))
    except ConfigError as exc:
        raise ManifestError(f"{source}: {exc}") from None


def _load(cls: type[M], directory: str | Path, missing: type[Exception], what: str, name: str = MANIFEST) -> M:
    f = Path(directory) / name
    if not f.is_file():
        raise missing(f"{f} does not exist: {directory} is not {what}")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{f}: not valid JSON ({exc})") from None
    return manifest_from_json(cls, data, f)


def load_store_manifest(store: str | Path) -> StoreManifest:
    """The manifest of the token store in directory ``store``."""
    try:
        return _load(StoreManifest, store, StoreError, "a token store, or its build has not finished")
    except ManifestError as exc:
        raise StoreError(str(exc)) from None


def load_checkpoint_manifest(checkpoint: str | Path) -> CheckpointManifest:
    """The manifest of the model checkpoint in directory ``checkpoint``."""
    return _load(CheckpointManifest, checkpoint, FileNotFoundError, "a checkpoint directory")


def load_checkpoint_files(step_dir: str | Path) -> CheckpointFiles:
    """The file list of the training checkpoint in ``step_dir`` (FileNotFoundError when it has none)."""
    return _load(CheckpointFiles, step_dir, FileNotFoundError, "a complete training checkpoint", CHECKPOINT_FILES)


def manifest_to_json(manifest: StoreManifest | CheckpointManifest | CheckpointFiles) -> dict[str, Any]:
    return to_dict(manifest)


def write_manifest(directory: str | Path, manifest: StoreManifest | CheckpointManifest | CheckpointFiles,
                   mode: int | None = None) -> Path:
    """Write ``DIR/manifest.json`` (``DIR/files.json`` for a :class:`CheckpointFiles`) atomically, checked first:
    what is written can be read back; ``mode``: its permissions whatever the umask (None: the umask's)."""
    name = CHECKPOINT_FILES if isinstance(manifest, CheckpointFiles) else MANIFEST
    data = manifest_to_json(manifest)
    manifest_from_json(type(manifest), data, Path(directory) / name)
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, mode)
    return path

