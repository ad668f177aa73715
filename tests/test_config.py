"""Typed YAML configuration with key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from common.config import ConfigError, describe, load_config, option, to_dict


@dataclass
class Inner:
    """A nested section."""

    size: int = option(4, "a size")
    rate: float = option(0.5, "a rate")
    mode: Literal["a", "b"] = option("a", "a mode")

    def validate(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"inner.size ({self.size}) must be positive")


@dataclass
class Outer:
    """The top level."""

    name: str = option("x", "a name")
    paths: list[str] = option([], "paths")
    maybe: int | None = option(None, "optional")
    flag: bool = option(False, "a flag")
    inner: Inner = option(Inner, "nested")


def test_yaml_then_values_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: from-yaml\ninner:\n  size: 8\n  rate: 1\npaths: [a]\n")
    cfg = load_config(Outer, f, ["inner.size=16", "paths=[b, c]", "flag=true", "maybe=3"], values={"name": "from-values"})
    assert cfg.name == "from-values"
    assert cfg.inner.size == 16 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.paths == ["b", "c"] and cfg.flag is True and cfg.maybe == 3
    assert to_dict(cfg)["inner"] == {"size": 16, "rate": 1.0, "mode": "a"}


def test_unknown_keys_are_rejected_with_the_valid_ones(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("nmae: y\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) \['nmae'\] in the top level \(did you mean "
                                          r"'name'\?\); valid keys: flag, inner"):
        load_config(Outer, f)
    f.write_text("name: y\n")  # the file is fine: a misspelt override is named, not blamed on the file
    with pytest.raises(ConfigError, match=r"^override 'inner.sise=3': unknown key 'sise' in section 'inner' \(did you "
                                          r"mean 'size'\?\); valid keys: mode, rate, size$"):
        load_config(Outer, f, overrides=["inner.sise=3"])
    with pytest.raises(ConfigError, match=r"^override 'flg=1': unknown key 'flg' in the top level \(did you mean"):
        load_config(Outer, overrides=["flg=1"])


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\ninner:\n  size: 3\n rate: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:4:2: not valid YAML: "):
        load_config(Outer, f)


@pytest.mark.parametrize("override,message", [
    ("inner.size=big", "inner.size: expected an integer, got 'big'"),
    ("flag=3", "flag: expected true or false"),
    ("inner.mode=c", r"inner.mode: 'c' is not one of \['a', 'b'\]"),
    ("inner=3", "inner: expected a section"),
    ("inner.size=0", r"inner.size \(0\) must be positive"),
    ("noequals", "not of the form key=value"),
])
def test_bad_values_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, overrides=[override])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys at the top level, not a list"):
        load_config(Outer, f)


def test_describe_lists_every_leaf_with_help():
    rows = {r[0]: r for r in describe(Outer)}
    assert set(rows) == {"name", "paths", "maybe", "flag", "inner.size", "inner.rate", "inner.mode"}
    assert rows["inner.rate"][2] == "0.5" and rows["inner.rate"][3] == "a rate"


def test_yaml_on_off_read_as_booleans_still_name_a_literal_choice(tmp_path):
    """YAML 1.1 reads a bare ``off`` as False: a field whose choices are strings including "off" takes it back."""
    from megatron_code.train_config import load_train_config

    path = tmp_path / "run.yaml"
    path.write_text("activation_checkpointing: off\ndata:\n  sources: [{path: s}]\n")
    assert load_train_config(str(path), []).activation_checkpointing == "off"
    assert load_train_config(str(path), ["activation_checkpointing=off"]).activation_checkpointing == "off"
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_train_config(str(path), ["activation_checkpointing=yes"])
