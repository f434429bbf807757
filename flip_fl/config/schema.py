"""Generic typed-dataclass loading with validation errors that name the key path.

`load_section(cls, raw, path)` turns a plain dict (from YAML) into a dataclass instance, checking
unknown keys (with a did-you-mean), types and the numeric ranges declared in field metadata.
The schema itself lives in `flip_fl.config`; this module knows nothing about flip-fl's keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A user error in a configuration: the message names the key path and what to change."""


def key(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, choices: Sequence[str] | None = None) -> Any:
    """Declare a config key: its default, its documentation line, an optional numeric range or choices.

    `choices` limits a string key to those names (e.g. a registry's, `flip_fl.registry`) and documents them
    as its type, exactly as a `Literal` of them would.
    """
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """Declare a nested section whose defaults come from its own dataclass."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "section": True})


def _choices_name(choices: Sequence[Any]) -> str:
    return " | ".join(repr(a) for a in choices)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return _choices_name(get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, dict):
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, path: str) -> Any:
    """Return `value` coerced to `tp` (ints to floats only) or raise ConfigError naming `path`."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {_choices_name(get_args(tp))}")
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _check_value(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        (item_tp,) = get_args(tp)
        return [_check_value(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp)
        return {_check_value(k, key_tp, f"{path}.{k}"): _check_value(v, value_tp, f"{path}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _check_choices(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {_choices_name(choices)}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for name, ok, symbol in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{path}: {value!r} is out of range; it must be {symbol} {bound}")


def load_section(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from mapping `raw`; every error names the offending key path."""
    where = path or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            child = f"{path}.{name}" if path else str(name)
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{child}: unknown key{hint}")
    values = {}
    for name, field in fields.items():
        child = f"{path}.{name}" if path else name
        if field.metadata.get("section"):
            values[name] = load_section(hints[name], raw.get(name), child)
        elif name in raw:
            value = _check_value(raw[name], hints[name], child)
            _check_choices(value, field.metadata, child)
            _check_range(value, field.metadata, child)
            values[name] = value
    return cls(**values)


def dump_section(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a loaded config (for writing the resolved config back to YAML)."""
    return dataclasses.asdict(obj)


def document(cls: type, path: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key path, type, default, doc) for every key of schema `cls`, sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        child = f"{path}.{field.name}" if path else field.name
        if field.metadata.get("section"):
            rows.append((child, "section", "", field.metadata["doc"]))
            rows.extend(document(hints[field.name], child))
            continue
        default = field.default_factory() if callable(field.default_factory) else field.default
        bounds = [f"{s} {field.metadata[n]}" for n, s in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if field.metadata.get(n) is not None]
        doc = field.metadata["doc"] + (f" Range: {', '.join(bounds)}." if bounds else "")
        choices = field.metadata.get("choices")
        tp = _choices_name(choices) if choices else _type_name(hints[field.name])
        rows.append((child, tp, repr(default) if default is not None else "null", doc))
    return rows
