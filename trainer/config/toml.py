"""TOML in and out: ``load_config`` (file + ``--section.key=value`` overrides -> a typed, validated
``JobConfig``) and ``dump_config`` (the resolved config, readable by ``load_config``).

Every key is checked against the dataclass it lands in: an unknown key or a value of the wrong type is a
fault that names the full key (``model.num_layers``) with a "did you mean", so a typo never silently falls
back to a default. All faults are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from trainer.config.rules import validate
from trainer.config.schema import ConfigError, JobConfig, JobFeatureConfig


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a TOML file, apply ``--section.key=value`` overrides, type-check and validate the result.

    Raises one ``ConfigError`` holding every fault: all unknown keys and wrong types first (with a "did you
    mean"), else every rule the values break."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path) from e
    loader = _Loader()
    for item in overrides or []:
        try:
            key, value = parse_override(item)
            _set_path(raw, key.split("."), value, key)
            loader.from_override[key] = item
        except ConfigError as e:
            loader.faults.extend(e.faults)
    cfg = loader.build(JobConfig, raw, prefix="")
    if loader.faults:
        # Rules on values are checked only once every key is known and typed: a rule run on a default that
        # stands in for a mistyped value would report a second, misleading fault.
        raise ConfigError(loader.faults, path)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(e.faults, path) from None
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``--model.num_layers=4`` -> ("model.num_layers", 4). Values are TOML literals; bare words are strings."""
    text = item[2:] if item.startswith("--") else item
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # unquoted strings such as paths
    return key, parsed


def _set_path(raw: dict[str, Any], parts: list[str], value: Any, full_key: str) -> None:
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, full_key)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {full_key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, full_key)] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, full_key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {full_key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _sections() -> dict[str, set[str]]:
    """Keys of every section, for "did you mean" across sections (``train.batch_size`` -> ``data.batch_size``)."""
    hints = typing.get_type_hints(JobConfig)
    sections = {name: {f.name for f in dataclasses.fields(hints[name])} for name in hints}
    sections["data.features"] = {f.name for f in dataclasses.fields(JobFeatureConfig)}
    return sections


class _Loader:
    """Builds the typed config from the TOML tree, collecting every unknown key and wrongly typed value."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        # Keys set on the command line, so their faults say so ("from --model.nhed=4").
        self.from_override: dict[str, str] = {}

    def fault(self, key: str, message: str) -> None:
        origin = next((o for k, o in self.from_override.items() if _within(key, k) or _within(k, key)), None)
        self.faults.append(f"{message} (from the override {origin})" if origin else message)

    def build(self, cls: type, raw: Any, prefix: str) -> Any:
        """An instance of ``cls`` from a TOML table; None when a fault leaves it unbuildable."""
        if not isinstance(raw, dict):
            self.fault(prefix, f"{prefix or 'config'}: expected a table, got {type(raw).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            full = _join(prefix, key)
            if key not in names:
                where = f"in [{_section_of(prefix)}]" if prefix else "at the top level"
                self.fault(full, f"unknown key {full!r} {where}{_suggest(key, prefix, names)}")
                continue
            try:
                kwargs[key] = self.coerce(value, hints[key], full)
            except ConfigError as e:
                self.fault(full, str(e))
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required field (e.g. a feature's name) is missing
            if not self.faults:
                self.fault(prefix, f"{prefix or 'config'}: {e}")
            return None

    def coerce(self, value: Any, hint: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, key)
        if origin in (types.UnionType, typing.Union):
            for option in typing.get_args(hint):
                try:
                    return _coerce_value(value, option, key)
                except ConfigError:
                    continue
            raise ConfigError(f"{key}: {value!r} matches none of the allowed types ({hint})")
        if origin is list:
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            (item_hint,) = typing.get_args(hint)
            items = []
            for i, v in enumerate(value):
                try:
                    items.append(self.coerce(v, item_hint, f"{key}.{i}"))
                except ConfigError as e:
                    self.fault(f"{key}.{i}", str(e))
            return items
        return _coerce_value(value, hint, key)


def _within(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _section_of(prefix: str) -> str:
    # data.features.0 -> data.features: the "did you mean" candidates are the same for every feature.
    parts = [p for p in prefix.split(".") if not p.isdigit()]
    return ".".join(parts)


def _suggest(key: str, prefix: str, known: set[str]) -> str:
    """A near miss in the same section, else the section that has this key (``train.batch_size``)."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {_join(prefix, close[0])!r}?"
    section = _section_of(prefix)
    elsewhere = [s for s, keys in _sections().items() if key in keys and s != section]
    if elsewhere:
        return f"; did you mean {elsewhere[0] + '.' + key!r}?"
    if not prefix:
        close = difflib.get_close_matches(key, sorted(_sections()), n=1, cutoff=0.6)
        if close:
            return f"; did you mean [{close[0]}]?"
    return f"; known keys: {sorted(known)}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce_value(value: Any, hint: Any, key: str) -> Any:
    """A scalar or Literal value, type-checked (containers and tables are ``_Loader.coerce``'s)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
            hint_text = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce_value(v, item_hint, f"{key}.{i}") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint in (int, str, bool):
        # bool is a subclass of int in Python: `num_layers = true` must still be rejected.
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")  # pragma: no cover - a bug in this file


# ---------------------------------------------------------------------------------------------------------
# Writing the resolved config next to the run's outputs


def dump_config(cfg: JobConfig) -> str:
    """TOML text of the resolved config (readable by ``load_config``)."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        lines += _dump_table(section.name, value)
    return "\n".join(lines) + "\n"


def _dump_table(name: str, obj: Any) -> list[str]:
    scalars, tables = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                tables += ["", f"[[{name}.{f.name}]]"] + [
                    f"{k.name} = {_toml_value(getattr(item, k.name))}" for k in dataclasses.fields(item)
                ]
        else:
            scalars.append(f"{f.name} = {_toml_value(value)}")
    return ["", f"[{name}]", *scalars, *tables]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf") if value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
