"""Reading config files: YAML with safe_load, `--set key.path=value` overrides, validation into a Config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flip_fl.config.schema import ConfigError, dump_section, load_section
from flip_fl.config.sections import Config
from flip_fl.config.validation import validate


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split a `--set key.path=value` item; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    path, text = item.split("=", 1)
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"--set {item!r}: the key path is empty or malformed")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {path}: value {text!r} is not valid YAML ({getattr(err, 'problem', err)})") from None
    return path.split("."), value


def set_key_path(raw: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Write `value` at the dotted key `path` of a raw config mapping, creating sections on the way.

    Errors name `where` the path came from (e.g. `--set defense.name` or `grid defense.name`).
    """
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise ConfigError(f"{where}: {path!r} is not a key path like defense.name")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is not a section")
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Write each `key.path=value` into the raw mapping (validation happens afterwards)."""
    for item in overrides:
        parts, value = parse_override(item)
        path = ".".join(parts)
        set_key_path(raw, path, value, f"--set {path}")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a Config (types, ranges, then cross-key rules)."""
    cfg = load_section(Config, raw, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a YAML config file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return config_from_dict(raw)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run actually used)."""
    return yaml.safe_dump(dump_section(cfg), sort_keys=False)


def from_yaml(text: str) -> Config:
    """Inverse of `to_yaml` (used by clients that receive the config in a message)."""
    return config_from_dict(yaml.safe_load(text))
