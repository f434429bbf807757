"""A sweep file: a base config, overrides and a grid of key paths -> values, parsed into validated points.

A sweep file is YAML:

    base: quickstart.yaml            # optional run config, relative to the sweep file
    config: {federation: {num_rounds: 8}}   # optional keys merged over base
    grid:                            # key path -> list of values; a list of such mappings is a union
      defense.name: [fedavg, krum]
      attack.mode: [single_shot, continuous]
      seed: [0, 1]
    rows: [defense.name]             # optional: the row keys (default: defense.*, flip_defense.*, roles.benign)
    title: My comparison             # optional heading of results.md

A grid mapping may also carry `label: TEXT`, the row name of its runs (e.g. FLIP).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flip_fl.config import Config, ConfigError, apply_overrides, config_from_dict, read_yaml
from flip_fl.config.loading import set_key_path
from flip_fl.config.schema import dump_section

SPEC_KEYS = {"base", "config", "grid", "rows", "title"}
ROW_PREFIXES = ("defense.", "flip_defense.", "roles.benign")


@dataclass
class Point:
    """One run of the grid: its overrides, run directory name, optional row label and resolved config."""

    overrides: dict[str, Any]
    name: str
    label: str | None
    cfg: Config


@dataclass
class Sweep:
    """A parsed sweep file: its points in grid order, row keys and title."""

    points: list[Point]
    row_keys: list[str]
    title: str
    spec: dict[str, Any] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """A value as it appears in tables and run names (strings bare, the rest as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def _slug(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_slug(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", format_value(value))


def run_name(overrides: dict[str, Any]) -> str:
    """Directory name of a point: `key=value` pairs joined by `__`, filesystem-safe (lists as a+b)."""
    name = "__".join(f"{k}={_slug(v)}" for k, v in overrides.items()) or "base"
    if len(name) > 180:
        name = name[:160] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _grid_entries(grid: Any) -> list[dict[str, Any]]:
    entries = grid if isinstance(grid, list) else [grid]
    if not entries or not all(isinstance(e, dict) and e for e in entries):
        raise ConfigError("grid: expected a mapping of key path -> list of values, or a list of such mappings")
    for i, entry in enumerate(entries):
        where = f"grid[{i}]" if isinstance(grid, list) else "grid"
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"{where}.label: expected a string, got {label!r}")
        for key, values in entry.items():
            if key != "label" and (not isinstance(values, list) or not values):
                raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
    return entries


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Parse and validate a sweep file: every point's config is checked before anything runs."""
    path = Path(path)
    spec = read_yaml(path)
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r}; valid keys: {', '.join(sorted(SPEC_KEYS))}")
    if "grid" not in spec:
        raise ConfigError(f"{path}: a sweep needs a grid (key path -> list of values)")
    raw: dict[str, Any] = {}
    if spec.get("base") is not None:
        base = Path(str(spec["base"]))
        try:
            raw = read_yaml(base if base.is_absolute() else path.parent / base)
        except ConfigError as err:
            raise ConfigError(f"{path}: base: {err}") from None
    extra = spec.get("config") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: config: expected a mapping of config keys")
    raw = apply_overrides(_merge(raw, extra), list(overrides or []))
    points: dict[str, Point] = {}
    for entry in _grid_entries(spec["grid"]):
        keys = [k for k in entry if k != "label"]
        for values in itertools.product(*(entry[k] for k in keys)):
            point_overrides = dict(zip(keys, values))
            name = run_name(point_overrides)
            point_raw = json.loads(json.dumps(raw))
            for key, value in point_overrides.items():
                set_key_path(point_raw, key, value, f"grid {key}")
            try:
                cfg = config_from_dict(point_raw)
            except ConfigError as err:
                raise ConfigError(f"run {name}: {err}") from None
            if name in points and points[name].overrides != point_overrides:
                raise ConfigError(f"grid: {points[name].overrides} and {point_overrides} would share the run "
                                  f"directory {name}; make the values distinguishable")
            points.setdefault(name, Point(point_overrides, name, entry.get("label"), cfg))
    varying = varying_keys(list(points.values()))
    rows = spec.get("rows")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, str) for r in rows)):
        raise ConfigError(f"{path}: rows: expected a list of key paths, got {rows!r}")
    row_keys = rows if rows is not None else [k for k in varying if k.startswith(ROW_PREFIXES)]
    return Sweep(list(points.values()), row_keys, str(spec.get("title") or f"Sweep {path.stem}"),
                 {**spec, "base": str((path.parent / spec["base"]).resolve()) if spec.get("base") else None,
                  "set": list(overrides or [])})


def value_at(cfg: Config, key: str) -> Any:
    """The value at dotted key `key` of a config (None for a defense parameter section the config does not hold)."""
    node: Any = dump_section(cfg)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def varying_keys(points: list[Point]) -> list[str]:
    """The grid keys whose value differs between points."""
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    return [k for k in keys if len({format_value(value_at(p.cfg, k)) for p in points}) > 1]
