"""Generic typed-dataclass loading with validation errors that name the key path.

`load_section(cls, raw, path)` turns a plain dict (from YAML) into a dataclass instance, checking
unknown keys (with a did-you-mean), types and the numeric ranges declared in field metadata.
The schema itself lives in `flip_fl.config`; this module knows nothing about flip-fl's keys.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol, Union, get_args, get_origin

from flip_fl.errors import ConfigError


class Family(Protocol):
    """What the schema needs of a family of named parts (`flip_fl.registry.Registry`)."""

    kind: str

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names."""

    def accepts_paths(self) -> bool:
        """Whether a dotted path to a user class is also a valid choice."""

    def lookup(self, name: str, key_path: str | None = None) -> Any:
        """The part `name` names (a ConfigError naming `key_path` when it names none)."""


def key(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, choices: Sequence[str] | None = None,
        family: Family | None = None) -> Any:
    """Declare a config key: its default, its documentation line, an optional numeric range or choices.

    `choices` limits a string key to those names and documents them as its type, exactly as a `Literal` of
    them would. `family` does the same with the names registered in a family of parts (`flip_fl.registry`),
    read when a config is loaded, and also accepts a dotted path where the family takes user classes.
    """
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None,
            "family": family}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """Declare a nested section whose defaults come from its own dataclass."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "section": True})


def plugin_sections(family: Family, name_key: str, doc: str) -> Any:
    """Declare the parameter sections of a family's parts: `<section>.<part name>.<parameter>`.

    In the YAML they sit beside the section's own keys (`defense: {name: krum, krum: {num_malicious: 4}}`);
    the field holds each given section as the part's `Params` dataclass, keyed by part name. A part given
    by dotted path keeps its parameters under its class name. `name_key` is the sibling key that chooses
    the part.
    """
    return dataclasses.field(default_factory=dict, metadata={"doc": doc, "plugins": family, "name_key": name_key})


def params_class(part: Any) -> type:
    """The `Params` dataclass of a part (an empty one when it declares none)."""
    params = getattr(part, "Params", None)
    return params if params is not None else NoParams


@dataclasses.dataclass
class NoParams:
    """The parameters of a part that has none."""


def section_name(family: Family, name: str) -> str:
    """The key of the parameter section of the part `name` names.

    Its registered name, also when given by dotted path; the class name for an unregistered class.
    """
    if not (family.accepts_paths() and "." in name):
        return name
    part = family.lookup(name)
    registered = getattr(part, "name", "")
    if registered in family.names and family.lookup(registered) is part:
        return str(registered)
    return name.rsplit(".", 1)[-1]


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
        raise ConfigError(f"{path}: {_short(value)} is not allowed; choose one of {_choices_name(get_args(tp))}")
    if origin in (Union, types.UnionType):
        specific = None
        for option in get_args(tp):
            try:
                return _check_value(value, option, path)
            except ConfigError as err:  # a type that fits but a value that does not (e.g. NaN) says more
                specific = specific or (err if not str(err).startswith(f"{path}: expected") else None)
        raise specific or ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {_short(value)}")
        (item_tp,) = get_args(tp)
        return [_check_value(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_short(value)}")
        key_tp, value_tp = get_args(tp)
        return {_check_value(k, key_tp, f"{path}.{k}"): _check_value(v, value_tp, f"{path}.{k}")
                for k, v in value.items()}
    if tp is Any:
        _check_free_value(value, path)
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {_short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                raise ConfigError(f"{path}: {_short(value)} does not fit a 64-bit integer")
            return value
        raise ConfigError(f"{path}: expected an integer, got {_short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_finite(value, path)
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {_short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_short(value)}")
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _check_finite(value: int | float, path: str) -> None:
    """NaN, inf and integers beyond float range pass every range check but break a run: refuse them."""
    if isinstance(value, int) and abs(value) > 1e300 or isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {_short(value)} is not a finite number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


FREE_VALUE_LIMIT = 10_000
"""Most values a free-form key (e.g. attack.trigger_args) may hold, YAML aliases expanded."""


def iter_values(value: Any, path: str, limit: int) -> Iterator[tuple[Any, str]]:
    """Every value nested in `value` with its key path; more than `limit` of them is a ConfigError.

    YAML aliases let a small file describe a huge structure (a "billion laughs"): the walk stops at the
    limit instead of expanding it.
    """
    stack, seen = [(value, path)], 0
    while stack:
        item, where = stack.pop()
        seen += 1
        if seen > limit:
            raise ConfigError(f"{path}: more than {limit} values once YAML aliases are expanded")
        yield item, where
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _check_free_value(value: Any, path: str) -> None:
    """A free-form value: a few settings, numbers finite."""
    for item, where in iter_values(value, path, FREE_VALUE_LIMIT):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            _check_finite(item, where)


def _check_choices(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {_short(value)} is not allowed; choose one of {_choices_name(choices)}")
    family = meta.get("family")
    if family is not None:
        family.lookup(value, path)  # an unknown name or a dotted path that does not import: one line naming `path`


def _load_plugin_sections(family: Family, chosen: str, raw: dict[str, Any], path: str,
                          keys: Sequence[str]) -> dict[str, Any]:
    """The parameter sections among a section's extra keys (beside its own `keys`), each loaded into its `Params`."""
    own = section_name(family, chosen)
    out = {}
    for name, value in raw.items():
        child = f"{path}.{name}"
        if name == own:
            part = family.lookup(chosen, f"{path}.{name}")
        elif name in family.names:
            part = family.lookup(name)
        else:
            close = difflib.get_close_matches(str(name), [*keys, *family.names], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{child}: unknown key{hint} (the parameters of a {family.kind} go under "
                              f"{path}.<its name>, one of {', '.join(family.names)})")
        out[name] = load_section(params_class(part), value, child)
    return out


def _check_range(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for name, ok, symbol in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{path}: {_short(value)} is out of range; it must be {symbol} {bound}")


def load_section(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from mapping `raw`; every error names the offending key path."""
    where = path or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_short(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    plugins = next((f for f in fields.values() if f.metadata.get("plugins")), None)
    if plugins is not None:
        extra = {name: v for name, v in raw.items() if name not in fields}
        raw = {name: v for name, v in raw.items() if name in fields} | {plugins.name: extra}
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
        elif field.metadata.get("plugins"):
            chosen = values.get(field.metadata["name_key"], fields[field.metadata["name_key"]].default)
            values[name] = _load_plugin_sections(field.metadata["plugins"], chosen, raw[name], path,
                                                 [k for k in fields if k != name])
        elif name in raw:
            value = _check_value(raw[name], hints[name], child)
            _check_choices(value, field.metadata, child)
            _check_range(value, field.metadata, child)
            values[name] = value
    return cls(**values)


def dump_section(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a loaded config (for writing the resolved config back to YAML).

    Parameter sections of plug-ins (`plugin_sections`) go back beside their section's keys, as they were given.
    """
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if field.metadata.get("plugins"):
            out.update({name: dump_section(params) for name, params in value.items()})
        elif dataclasses.is_dataclass(value):
            out[field.name] = dump_section(value)
        else:
            out[field.name] = copy.deepcopy(value)
    return out


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
        if field.metadata.get("plugins"):
            rows.append((f"{path}.<name>", "sections", "", field.metadata["doc"]))
            rows.extend(_document_plugins(field.metadata["plugins"], path))
            continue
        default = field.default_factory() if callable(field.default_factory) else field.default
        bounds = [f"{s} {field.metadata[n]}" for n, s in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if field.metadata.get(n) is not None]
        doc = field.metadata["doc"] + (f" Range: {', '.join(bounds)}." if bounds else "")
        choices, family = field.metadata.get("choices"), field.metadata.get("family")
        if family is not None:
            choices = family.names
            doc += " Or a dotted path to your own class (docs/ARCHITECTURE.md)." if family.accepts_paths() else ""
        tp = _choices_name(choices) if choices else _type_name(hints[field.name])
        rows.append((child, tp, repr(default) if default is not None else "null", doc))
    return rows


def _document_plugins(family: Family, path: str) -> list[tuple[str, str, str, str]]:
    """A section per registered part that has parameters, with its `Params` keys."""
    rows = []
    for name in family.names:
        part = family.lookup(name)
        params = params_class(part)
        if not dataclasses.fields(params):
            continue
        summary = (part.__doc__ or "").strip().split("\n")[0]
        rows.append((f"{path}.{name}", "section", "", f"Parameters of {family.kind} {name}: {summary}"))
        rows.extend(document(params, f"{path}.{name}"))
    return rows
