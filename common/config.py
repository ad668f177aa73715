"""Typed configuration: dataclasses per concern, loaded from YAML, overridden by ``key=value``.

Every job's configuration is a tree of dataclasses. A YAML file gives values for some of its fields and
command-line overrides (``pack.seq_len=2048``, ``inputs=[a,b]``) give the last word. Unknown keys are rejected
with the list of valid ones, and every value is checked against the field's type before the job starts, so a
typo fails in the first second, not after an hour in a queue.

Fields carry their documentation in ``metadata["help"]`` (see :func:`option`), from which ``docs/`` generates
its tables of configuration keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value, key or file is wrong; the message names which."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with its documentation. Mutable defaults are wrapped in a factory."""
    metadata = {"help": help}
    if isinstance(default, list | dict):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless (int -> float, str -> Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        concrete = [arg for arg in args if arg is not type(None)]
        if len(concrete) == 1:  # X | None: X's own error says what is wrong
            return _coerce(value, concrete[0], where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and {"on", "off"} & set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off/yes/no as a boolean
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected: a list of one
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e9" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def _build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        label = f"section '{where}'" if where else "the top level"
        raise ConfigError(f"unknown key(s) {unknown} in {label}{_did_you_mean(unknown, types_)}; valid keys: "
                          f"{', '.join(sorted(types_))}")
    required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.init]
    missing = [name for name in required if name not in values]
    if missing:
        label = f"section '{where}'" if where else "the top level"
        raise ConfigError(f"missing key(s) {missing} in {label}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, types_[name], f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:  # validators raise ValueError naming the field and value
            raise ConfigError(str(exc)) from None
    return obj


def _did_you_mean(unknown: list[str], valid: Iterable[str]) -> str:
    """`` (did you mean 'lr'?)`` for the first unknown key close to a valid one, else ''."""
    for key in unknown:
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


def check_override(cls: type, text: str) -> None:
    """An override's key names real keys of ``cls``, section by section; the error names the override, the
    section and the closest key. Paths into a mapping or list value are left to the value checks."""
    path, _ = parse_override(text)
    tp: Any = cls
    for depth, part in enumerate(path):
        if not _is_dataclass_type(tp):
            return
        types_ = _field_types(tp)
        if part not in types_:
            section = f"section '{'.'.join(path[:depth])}'" if depth else "the top level"
            raise ConfigError(f"override {text!r}: unknown key {part!r} in {section}"
                              f"{_did_you_mean([part], types_)}; valid keys: {', '.join(sorted(types_))}")
        tp = types_[part]
        if get_origin(tp) in (Union, types.UnionType):  # Optional[Section]: the section
            args = [a for a in get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None


def _read_yaml(p: Path) -> Any:
    """A YAML file's content; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build the dataclass ``cls`` from plain data, checking every key and value as :func:`load_config` does."""
    return _build(cls, values, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML so numbers, booleans and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from a YAML file, then a mapping of values, then ``key=value`` overrides (last wins)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = _read_yaml(p)
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys at the top level, not a "
                              f"{type(loaded).__name__}")
        tree = loaded
    for key, value in (values or {}).items():
        _merge(tree, key.split("."), value)
    for text in overrides:
        check_override(cls, text)  # a misspelt override is named as such, not blamed on the file
        keys, value = parse_override(text)
        _merge(tree, keys, value)
    try:
        return _build(cls, tree, "")
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain data (for manifests and YAML dumps)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field, for generated documentation."""
    rows = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        tname = str(tp).replace("typing.", "") if get_origin(tp) else getattr(tp, "__name__", str(tp))
        rows.append((key, tname, default, f.metadata.get("help", "")))
    return rows
